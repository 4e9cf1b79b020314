//! A throwaway PostgreSQL server for the tests that need one: one cluster per test run
//! (`initdb` into target/tmp, `pg_ctl start` on a free port with password authentication over
//! TCP), a fresh database per test, stopped and deleted by a watchdog once the test process
//! has exited. PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user the distribution's package creates. When the server cannot start the test
//! fails with the reason; it never skips (`make test` installs the package when missing).
//!
//! Everything here blocks: async tests call it through `spawn_blocking`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

struct Cluster {
    port: u16,
    password: String,
}

impl Cluster {
    fn url(&self, database: &str) -> String {
        format!(
            "postgres://tripwire:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The password every database URL from [`database`] carries (to check it is never printed).
pub fn password() -> String {
    cluster().password.clone()
}

/// A new, empty database on the test cluster; its URL, password included.
pub fn database() -> String {
    let cluster = cluster();
    let name = format!("t_{}", uuid::Uuid::now_v7().simple());
    let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL server: {e}"));
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    cluster.url(&name)
}

fn cluster() -> &'static Cluster {
    match CLUSTER.get_or_init(start) {
        Ok(cluster) => cluster,
        Err(reason) => panic!("the test PostgreSQL server could not start: {reason}"),
    }
}

fn start() -> Result<Cluster, String> {
    let bin = bin_dir().ok_or(
        "initdb and pg_ctl not found in /usr/lib/postgresql/*/bin or on PATH; run `make test` \
         (it installs the distribution's postgresql package) or `apt-get install postgresql`",
    )?;
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pg-{}", std::process::id()));
    let _stale = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let data = root.join("data");
    let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
    let pwfile = root.join("pwfile");
    std::fs::write(&pwfile, &password).map_err(|e| e.to_string())?;
    let as_root = is_root();
    if as_root {
        // The server's user must own its directory.
        run(Command::new("chown").arg("-R").arg("postgres").arg(&root))?;
    }
    run(server_command(as_root, &bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "tripwire", "-E", "UTF8", "--no-sync"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display())))?;
    let log = root.join("server.log");
    let mut last = String::new();
    // A free port can be taken between looking and binding: try a few.
    for _ in 0..3 {
        let port = free_port()?;
        let started = run(server_command(as_root, &bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off",
                root.display()
            ))
            .arg("start"));
        match started {
            Ok(()) => {
                watchdog(as_root, &bin, &data, &root)?;
                return Ok(Cluster { port, password });
            }
            Err(err) => {
                last = format!(
                    "{err}\nserver log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }
    Err(last)
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu), else the directory of
/// `pg_ctl` on PATH.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `program`, as the `postgres` user when we are root.
fn server_command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} exited with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// A shell, in its own process group (so Ctrl-C on the tests does not kill it first), that
/// waits for this process to exit, then stops the server and deletes its files.
fn watchdog(as_root: bool, bin: &Path, data: &Path, root: &Path) -> Result<(), String> {
    let stop = if as_root {
        "runuser -u postgres -- \"$1/pg_ctl\""
    } else {
        "\"$1/pg_ctl\""
    };
    let script = format!(
        "while kill -0 \"$0\" 2>/dev/null; do sleep 0.5; done; \
         {stop} -D \"$2\" stop -m immediate >/dev/null 2>&1; rm -rf \"$3\""
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(std::process::id().to_string())
        .arg(bin)
        .arg(data)
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|e| format!("cannot start the server's watchdog: {e}"))
}
