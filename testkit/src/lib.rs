//! idgraph-testkit: the one harness for real `idgraph-node` processes,
//! shared by the node's process tests (`node/tests/`) and the chaos
//! harness (`chaos-tests/`).
//!
//! [`NodeLaunch`] says how to start a node (binary, listen address, data
//! directory, arguments, environment, where its log goes); [`NodeProcess`]
//! is the running process: started once it printed the address it listens
//! on, killed when dropped and when the test process dies (so no node
//! outlives a test, even one killed itself), and signalled, paused or
//! waited for by the test. [`free_ports`] finds loopback ports by binding
//! port 0.

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The line a node prints on stdout once it listens, before its address.
pub const LISTENING: &str = "idgraph-node listening on ";
/// The line before it when the node serves metrics, before their address.
pub const METRICS: &str = "idgraph-node metrics on ";

/// How long a node may take to print its address (opening a large data
/// directory included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start one node process.
#[derive(Clone, Debug)]
pub struct NodeLaunch {
    bin: PathBuf,
    listen: String,
    data_dir: PathBuf,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    log: Option<PathBuf>,
}

impl NodeLaunch {
    /// A node from `bin` on `data_dir`, listening on a free loopback port,
    /// logging warnings to the test's stderr (`log_var` names an environment
    /// variable holding another tracing filter, e.g. `TEST_NODE_LOG`), and
    /// shutting down quickly on SIGTERM.
    pub fn new(bin: impl Into<PathBuf>, data_dir: impl Into<PathBuf>, log_var: &str) -> NodeLaunch {
        NodeLaunch {
            bin: bin.into(),
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.into(),
            args: Vec::new(),
            env: vec![
                ("IDGRAPH_LOG_LEVEL".into(), std::env::var(log_var).unwrap_or_else(|_| "warn".into())),
                ("IDGRAPH_SHUTDOWN_GRACE_MS".into(), "500".into()),
            ],
            log: None,
        }
    }

    /// Listens on `addr` instead of a free port.
    pub fn listen(mut self, addr: impl Into<String>) -> NodeLaunch {
        self.listen = addr.into();
        self
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> NodeLaunch {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> NodeLaunch {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (a later value for the same name wins).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeLaunch {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Appends the node's stderr (its log) to `file` instead of the test's.
    pub fn log_to(mut self, file: impl Into<PathBuf>) -> NodeLaunch {
        self.log = Some(file.into());
        self
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the process and waits until it prints the address it listens
    /// on; a node that exits instead (it could not open its data directory)
    /// or stays silent is an error naming its log.
    pub async fn start(&self) -> anyhow::Result<NodeProcess> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(&self.listen)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env_remove("FAILPOINTS")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped());
        match &self.log {
            Some(file) => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file)
                    .with_context(|| format!("opening {}", file.display()))?;
                cmd.stderr(Stdio::from(log));
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        // The node dies with the test process, even when that is killed.
        // SAFETY: the closure makes one async-signal-safe system call.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("the node's stdout")?;
        // The metrics line, when the node serves metrics, comes first.
        let mut line = String::new();
        let mut metrics_addr = None;
        let mut lines = BufReader::new(stdout);
        let addr = loop {
            line.clear();
            match tokio::time::timeout(START_TIMEOUT, lines.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => match line.trim().strip_prefix(METRICS) {
                    Some(m) => metrics_addr = Some(m.to_string()),
                    None => break line.trim().strip_prefix(LISTENING).map(str::to_string),
                },
                _ => break None,
            }
        };
        let Some(addr) = addr else {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            let shown = status.map(|s| s.to_string()).unwrap_or_default();
            let log = self.log.as_ref().map_or_else(|| "its stderr above".to_string(), |f| f.display().to_string());
            let message = format!("the node on {} did not start ({shown}, first line {line:?}); see {log}", self.data_dir.display());
            return Err(NotStarted { status, message }.into());
        };
        Ok(NodeProcess { child, addr, metrics_addr })
    }
}

/// A running node process. Killed (SIGKILL) and waited for when dropped,
/// so that a node started again on the same data directory or port never
/// meets the old process still holding them.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The address it listens on, `HOST:PORT`.
    pub addr: String,
    /// Where it serves metrics, when started with `--metrics-listen`.
    pub metrics_addr: Option<String>,
}

impl NodeProcess {
    /// `http://HOST:PORT`, for gRPC clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id, while the process has not been waited for.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (SIGTERM, SIGKILL, SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the node was already waited for")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("sending {signal} to node {pid}"))
    }

    /// `kill -9`, then waits for the process to end.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Whether the process has ended, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // `id()` is None once the process was waited for.
        if let Some(pid) = self.child.id() {
            let _ = self.child.start_kill();
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
        }
    }
}

/// A node process that ended (or was ended) before it said where it
/// listens: [`NodeLaunch::start`]'s error, so that a caller can tell how it
/// ended (a chaos run's node stopped at an armed crash point while
/// starting).
#[derive(Debug)]
pub struct NotStarted {
    /// How the process ended, when that could be read.
    pub status: Option<ExitStatus>,
    message: String,
}

impl std::fmt::Display for NotStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NotStarted {}

/// Free loopback ports, each checked by binding it (all held at once, so
/// they differ).
///
/// They are taken below the kernel's range of ephemeral ports
/// (`net.ipv4.ip_local_port_range`), not from binding port 0, which hands
/// out ports of that range: a node restarted on its port (its peers know
/// the address) could find it taken by the local end of some client's
/// outgoing connection ("Address already in use"). Where that range
/// cannot be read, port 0 is bound as before.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()));
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    match ephemeral_low.filter(|low| *low > LOWEST_PORT + 1000) {
        Some(low) => {
            let mut tries = 0;
            while listeners.len() < n {
                tries += 1;
                if tries > 10_000 {
                    return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free port in {LOWEST_PORT}..{low}")));
                }
                if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", fastrand::u16(LOWEST_PORT..low))) {
                    listeners.push(l);
                }
            }
        }
        None => {
            for _ in 0..n {
                listeners.push(std::net::TcpListener::bind("127.0.0.1:0")?);
            }
        }
    }
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// The lowest port [`free_ports`] hands out: above the well-known and most
/// registered service ports.
const LOWEST_PORT: u16 = 20_000;

#[cfg(test)]
mod tests {
    /// A process that ends before it listens is a [`super::NotStarted`]
    /// carrying how it ended, also under context added by a caller.
    #[test]
    fn a_process_that_ends_before_listening_says_how_it_ended() {
        use anyhow::Context;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = std::env::temp_dir();
        let Err(e) = rt.block_on(super::NodeLaunch::new("/bin/false", &dir, "TESTKIT_UNUSED").start()).context("node 1") else {
            panic!("/bin/false never listens");
        };
        let ended = e.downcast_ref::<super::NotStarted>().expect("a NotStarted under the context");
        assert_eq!(ended.status.and_then(|s| s.code()), Some(1), "{e:#}");
        assert!(format!("{e:#}").contains("did not start"), "{e:#}");
    }

    #[test]
    fn free_ports_differ_bind_and_stay_below_the_ephemeral_range() {
        let ports = super::free_ports(8).unwrap();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 8, "{ports:?}");
        for p in &ports {
            drop(std::net::TcpListener::bind(("127.0.0.1", *p)).expect("a free port binds"));
        }
        if let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") {
            let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
            if low > super::LOWEST_PORT + 1000 {
                assert!(ports.iter().all(|p| (super::LOWEST_PORT..low).contains(p)), "{ports:?} against {low}");
            }
        }
    }
}
