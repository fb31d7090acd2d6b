//! Prints a SCRAM-SHA-256 verifier with few iterations for `benches/load_compare.sh`, which
//! gives the same one to tenantgate (`CREATE USER ... PASSWORD 'SCRAM-SHA-256$16:...'`),
//! PgBouncer (auth_file) and PostgreSQL (`CREATE ROLE ... PASSWORD`), so a login costs the
//! proxy and the server what it costs them, not the client's PBKDF2. A bench tool, not for real
//! passwords (the salt is fixed).
//!
//!     scram_verifier PASSWORD [ITERATIONS]      # ITERATIONS: 16 by default

#![allow(clippy::print_stdout, reason = "the verifier is the output")]

mod support;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let password = args
        .next()
        .context("usage: scram_verifier PASSWORD [ITERATIONS]")?;
    let iterations: u32 = match args.next() {
        Some(n) => n.parse().context("ITERATIONS must be a positive number")?,
        None => 16,
    };
    anyhow::ensure!(iterations > 0, "ITERATIONS must be a positive number");
    println!("{}", support::scram_verifier(&password, iterations));
    Ok(())
}
