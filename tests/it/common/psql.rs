//! psql as a subprocess, as a person runs it: the cluster's own psql, no psqlrc, never a
//! password prompt, ON_ERROR_STOP, a 10 s connect timeout, and PGPASSWORD only when the test
//! gives one. Output is unaligned tuples (one value a line) unless asked for the tables a
//! person reads.

use std::process::{Command, Output};

/// A psql invocation against one connection string (URI or `key=value` conninfo).
pub struct Psql {
    conninfo: String,
    password: Option<String>,
    aligned: bool,
}

/// What psql did.
pub struct PsqlOutput {
    pub conninfo: String,
    /// Exit status 0.
    pub ok: bool,
    /// Standard output, trimmed.
    pub stdout: String,
    pub stderr: String,
}

impl Psql {
    pub fn new(conninfo: &str) -> Psql {
        Psql {
            conninfo: conninfo.to_owned(),
            password: None,
            aligned: false,
        }
    }

    /// Gives psql `password` in PGPASSWORD.
    #[must_use]
    pub fn password(mut self, password: &str) -> Psql {
        self.password = Some(password.to_owned());
        self
    }

    /// Aligned tables with headers and row counts, as psql shows them to a person.
    #[must_use]
    pub fn aligned(mut self) -> Psql {
        self.aligned = true;
        self
    }

    fn command(&self, commands: &[&str]) -> Command {
        let mut cmd = Command::new(super::cluster().bindir().join("psql"));
        cmd.arg(&self.conninfo)
            .args(["-X", "-w", "-v", "ON_ERROR_STOP=1"]);
        if !self.aligned {
            cmd.arg("-At");
        }
        for sql in commands {
            cmd.args(["-c", sql]);
        }
        cmd.env("PGCONNECT_TIMEOUT", "10").env_remove("PGPASSWORD");
        if let Some(password) = &self.password {
            cmd.env("PGPASSWORD", password);
        }
        cmd
    }

    fn output(&self, out: &Output) -> PsqlOutput {
        PsqlOutput {
            conninfo: self.conninfo.clone(),
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `sql` without blocking the runtime (the proxy may run on it).
    pub async fn run(&self, sql: &str) -> PsqlOutput {
        self.run_all(&[sql]).await
    }

    /// Runs `sql`; returns whether psql succeeded and all it printed (standard output, then
    /// standard error), for tests that look for words wherever psql put them.
    pub async fn run_text(&self, sql: &str) -> (bool, String) {
        let out = self.run(sql).await;
        (out.ok, format!("{}\n{}", out.stdout, out.stderr))
    }

    /// Runs each of `commands` as its own `-c`, in one session.
    pub async fn run_all(&self, commands: &[&str]) -> PsqlOutput {
        let out = tokio::process::Command::from(self.command(commands))
            .output()
            .await
            .expect("run psql");
        self.output(&out)
    }

    /// Runs `sql`, blocking the thread: for tests without a runtime.
    pub fn run_blocking(&self, sql: &str) -> PsqlOutput {
        let out = self.command(&[sql]).output().expect("run psql");
        self.output(&out)
    }
}

impl PsqlOutput {
    /// Standard output; panics with standard error if psql failed.
    pub fn expect_ok(self) -> String {
        assert!(self.ok, "psql {}: {}", self.conninfo, self.stderr);
        self.stdout
    }
}
