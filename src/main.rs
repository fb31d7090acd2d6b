//! The `tenantgate` command: serve, quickstart, and tenant/user/key management through the
//! registry. This file parses the command line, runs it (`cli`) and turns the outcome into an
//! exit code: 0 success, 1 failure, 2 a broken config or command line. What each command does
//! lives in `cli`; this file must not grow any of it.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser as _;
use tenantgate::config::ConfigError;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            drop(e.print());
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::from(e), 1),
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => fail(&e, 2),
        Err(e) => fail(&e, 1),
    }
}

fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    let line = format!("tenantgate: {}", error_line(e));
    drop(writeln!(std::io::stderr().lock(), "{line}"));
    ExitCode::from(code)
}

/// The error and its causes on one line, each cause once: many errors already show their
/// source in their own message, and a cause whose text is already on the line is skipped.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn an_error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("/etc/x: cannot read: No such file");
        assert_eq!(error_line(&e), "/etc/x: cannot read: No such file");
        let inner = anyhow::anyhow!("connection refused");
        let e = inner
            .context("registry unavailable")
            .context("cannot start");
        assert_eq!(
            error_line(&e),
            "cannot start: registry unavailable: connection refused"
        );
    }
}
