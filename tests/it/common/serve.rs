//! `tenantgate serve` as its own process, the way an operator or systemd runs it: a config
//! file written from a test's config, stderr (the log) into a file, signals sent with
//! `kill`. For the tests of what only a real process has: its log format, its signals, its
//! exit code, sd_notify. It must not share anything with the in-process proxy but the
//! registry and the cluster; dropping it kills the process, so a failed test leaves none.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tenantgate::config::Config;

use super::{TestEnv, free_port, unique};

const BIN: &str = env!("CARGO_BIN_EXE_tenantgate");

/// A running `tenantgate serve`.
pub struct ServeProcess {
    child: Child,
    pub port: u16,
    /// Its stderr: the log.
    pub log: PathBuf,
}

impl ServeProcess {
    /// Starts `tenantgate serve` on `env`'s registry and server, on a free port, with the
    /// config `tweak` changes and the extra environment `vars`. Returns at once: see
    /// [`ServeProcess::wait_accepting`].
    pub fn start(
        env: &TestEnv,
        tweak: impl FnOnce(&mut Config),
        vars: &[(&str, &std::ffi::OsStr)],
    ) -> ServeProcess {
        let port = free_port();
        let mut config = env.config.clone();
        config.proxy.listen = ([127, 0, 0, 1], port).into();
        config.source = None;
        tweak(&mut config);
        let file = env.dir.join(unique("serve-")).with_extension("toml");
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let log = file.with_extension("log");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&file)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ServeProcess { child, port, log }
    }

    /// Waits until the port takes TCP connections.
    pub async fn wait_accepting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tenantgate serve exited with {status}: {}", self.log_text());
            }
            assert!(Instant::now() < deadline, "tenantgate serve did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` ("TERM", "INT", "HUP") to the process.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// Its exit status, once it has exited within `timeout`; `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// tokio-postgres config for a client of `database` through this process.
    pub fn client_config(
        &self,
        database: &str,
        user: &str,
        password: &str,
    ) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// Connects a client through this process.
    pub async fn connect(
        &self,
        database: &str,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self
            .client_config(database, user, password)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move { drop(connection.await) });
        Ok(client)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            drop(self.child.kill());
            drop(self.child.wait());
        }
    }
}
