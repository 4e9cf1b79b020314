//! The `tripwire` binary as a test runs it: started, its addresses read from its log, stopped
//! with a signal, killed when a test fails; and metrics read from Prometheus text.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the child when the test ends early (a failed assertion), so no gateway outlives it.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _killed = self.0.kill();
            let _reaped = self.0.wait();
        }
    }
}

pub fn tripwire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tripwire"))
}

/// Reads stderr lines until the "tripwire serving" line and returns the proxy address.
pub fn wait_for_listen(child: &mut Child, log: &mut String) -> String {
    let stderr = child.stderr.as_mut().unwrap();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "tripwire exited early:\n{log}");
        log.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(line) = log.lines().find(|l| l.contains("tripwire serving")) {
            let addr = line
                .split("listen=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap();
            return addr.to_owned();
        }
    }
    panic!("tripwire did not start:\n{log}");
}

pub fn terminate(child: &mut Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A `tripwire serve` started by a test: the child (killed on drop), the proxy and admin
/// addresses, and threads collecting everything it writes to stderr and stdout.
pub struct Served {
    pub guard: KillOnDrop,
    pub listen: String,
    pub admin: String,
    pub log: std::thread::JoinHandle<String>,
    pub stdout: std::thread::JoinHandle<String>,
}

/// Starts `tripwire serve` on free ports with `args`.
pub fn serve(
    args: &[&std::ffi::OsStr],
) -> (KillOnDrop, String, String, std::thread::JoinHandle<String>) {
    let served = serve_with(args, &[]);
    (served.guard, served.listen, served.admin, served.log)
}

/// [`serve`] with `env` set; both pipes are drained while it runs (at `trace` level it writes
/// more than a pipe holds).
pub fn serve_with(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Served {
    let mut guard = spawn_serve(args, env);
    let mut log = String::new();
    let listen = wait_for_listen(&mut guard.0, &mut log);
    let admin = log
        .lines()
        .find(|l| l.contains("tripwire serving"))
        .and_then(|l| l.split("admin=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let drain = |mut pipe: Box<dyn Read + Send>, mut text: String| {
        std::thread::spawn(move || {
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let log = drain(Box::new(guard.0.stderr.take().unwrap()), log);
    let stdout = drain(Box::new(guard.0.stdout.take().unwrap()), String::new());
    Served {
        guard,
        listen,
        admin,
        log,
        stdout,
    }
}

/// `tripwire serve` on free ports with `args` and `env`, both pipes open for the caller.
pub fn spawn_serve(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> KillOnDrop {
    KillOnDrop(
        tripwire()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// The value of an unlabelled metric, or the sum of a labelled family, in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every flag in the SQLite log at `store`, as `tripwire flags list --json` prints them.
pub fn flags_json(store: &std::path::Path) -> Vec<serde_json::Value> {
    let output = tripwire()
        .args(["flags", "list", "--json", "--limit", "1000000", "--store"])
        .arg(store)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
