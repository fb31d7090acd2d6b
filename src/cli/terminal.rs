//! What the management commands print and read on the terminal: one result on standard
//! output, a password from a no-echo prompt or standard input. Progress and errors go to
//! standard error elsewhere; this module must not print a password back.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use tenantgate::crypto::Secret;

/// A command's result, on standard output.
pub(super) fn say(text: &str) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}

/// From a no-echo prompt on a terminal, else the first line of standard input.
pub(super) fn read_password(prompt: &str) -> anyhow::Result<Secret> {
    let password = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(prompt)?
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    anyhow::ensure!(!password.is_empty(), "the password must not be empty");
    Ok(Secret::new(password))
}
