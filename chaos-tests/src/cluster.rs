//! A cluster of real `idgraph-node` processes on loopback.
//!
//! Each node has its own data directory and log file under the run
//! directory, listens on a free port, and reaches its peers through the
//! harness's proxy links (`IDGRAPH_PEER_ROUTES`). The harness kills,
//! pauses and restarts the processes; [`Cluster::reap`] notices the ones
//! that exited on their own (a crash point, or a crash that is a finding).
//!
//! For `disk-full` faults each node's data directory lives on a tmpfs of
//! its own (`nodeN.fs/data`), so that a ballast file beside it
//! (`nodeN.fs/ballast`) fills that node's disk and no other. The mounts are
//! made in the harness's private mount namespace
//! ([`private_mount_namespace`]) and vanish with it.

use crate::proxy::Network;
use anyhow::{bail, Context};
use idgraph_proto::v1 as pb;
use idgraph_testkit::{free_ports, NodeLaunch, NodeProcess};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::Signal;
use nix::sys::statvfs::statvfs;
use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::transport::Channel;

/// How a cluster is started.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub node_bin: PathBuf,
    pub nodes: usize,
    pub shards: u32,
    pub dir: PathBuf,
    pub heartbeat_ms: u64,
    /// Size of a tmpfs of its own for each node's data directory, which
    /// `disk-full` faults fill; None keeps the data directories on the run
    /// directory's file system. Needs [`private_mount_namespace`] first.
    pub tmpfs_bytes: Option<u64>,
}

/// How a node process ended, when the harness did not end it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UnexpectedExit {
    pub node: usize,
    pub status: String,
    /// Exited at a crash point it was told to stop at (not a finding).
    pub crash_point: bool,
}

pub struct Node {
    pub index: usize,
    pub id: u64,
    pub addr: SocketAddr,
    /// The data directory.
    pub dir: PathBuf,
    /// The node's log (stderr), on the run directory's file system.
    pub log: PathBuf,
    /// Where the node's own tmpfs is mounted (the data directory is `data`
    /// in it), when it has one.
    pub mount: Option<PathBuf>,
    child: Option<NodeProcess>,
    paused: bool,
    /// FAILPOINTS the running process was started with.
    failpoints: Option<String>,
}

impl Node {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The file that fills the node's tmpfs during a `disk-full` fault.
    fn ballast(&self) -> Option<PathBuf> {
        self.mount.as_ref().map(|m| m.join("ballast"))
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub nodes: Vec<Node>,
    pub network: Network,
    initial_cluster: String,
}

impl Cluster {
    /// Starts every node and waits until each serves gRPC.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&spec.dir)?;
        anyhow::ensure!(
            spec.tmpfs_bytes.is_none() || PRIVATE_MOUNTS.load(Ordering::SeqCst),
            "tmpfs data directories need a private mount namespace (cluster::private_mount_namespace)"
        );
        let addrs: Vec<SocketAddr> = free_ports(spec.nodes)?.into_iter().map(|p| SocketAddr::from(([127, 0, 0, 1], p))).collect();
        let network = Network::start(&addrs).await?;
        let initial_cluster = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mount = spec.tmpfs_bytes.map(|_| spec.dir.join(format!("node{}.fs", i + 1)));
                Node {
                    index: i,
                    id: i as u64 + 1,
                    addr: *a,
                    dir: mount.as_ref().map_or_else(|| spec.dir.join(format!("node{}", i + 1)), |m| m.join("data")),
                    log: spec.dir.join(format!("node{}.log", i + 1)),
                    mount,
                    child: None,
                    paused: false,
                    failpoints: None,
                }
            })
            .collect();
        let mut cluster = Cluster { spec, nodes, network, initial_cluster };
        if let Some(bytes) = cluster.spec.tmpfs_bytes {
            for node in &cluster.nodes {
                let Some(at) = &node.mount else { continue };
                std::fs::create_dir_all(at)?;
                let options = format!("size={bytes},mode=0755");
                mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some(options.as_str()))
                    .with_context(|| format!("mounting a tmpfs on {}", at.display()))?;
                tracing::debug!(node = node.id, at = %at.display(), bytes, "tmpfs mounted");
            }
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i, None).await?;
        }
        Ok(cluster)
    }

    fn routes(&self, from: usize) -> String {
        self.nodes
            .iter()
            .filter(|n| n.index != from)
            .filter_map(|n| self.network.link(from, n.index).map(|l| format!("{}={}", n.addr, l.addr)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i`'s process and waits for its listening line.
    pub async fn spawn(&mut self, i: usize, failpoints: Option<&str>) -> anyhow::Result<()> {
        let routes = self.routes(i);
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(&node.dir)?;
        let mut launch = NodeLaunch::new(&self.spec.node_bin, &node.dir, "CHAOS_NODE_LOG")
            .listen(node.addr.to_string())
            .args(["--id".to_string(), node.id.to_string()])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--shards".to_string(), self.spec.shards.to_string()])
            .env("IDGRAPH_PEER_ROUTES", routes)
            .env("IDGRAPH_RAFT_HEARTBEAT_MS", self.spec.heartbeat_ms.to_string())
            // Frequent snapshots: a node back from a fault often catches
            // up by installing one (and a crash point can stop it there).
            .env("IDGRAPH_RAFT_SNAPSHOT_LOGS", "50")
            .env("IDGRAPH_SHUTDOWN_GRACE_MS", "200")
            .log_to(&node.log);
        if let Some(f) = failpoints {
            launch = launch.env("FAILPOINTS", f);
        }
        let process = launch.start().await.with_context(|| format!("node {}", node.id))?;
        node.child = Some(process);
        node.paused = false;
        node.failpoints = failpoints.map(str::to_string);
        Ok(())
    }

    /// `kill -9`.
    pub async fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            child.kill().await;
        }
        node.paused = false;
    }

    pub fn pause(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.child.as_ref().is_some_and(|c| c.signal(Signal::SIGSTOP).is_ok()) {
            node.paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(child) = &node.child {
            let _ = child.signal(Signal::SIGCONT);
        }
        node.paused = false;
    }

    /// Nodes that exited on their own since the last call.
    pub fn reap(&mut self) -> Vec<UnexpectedExit> {
        let mut out = Vec::new();
        for node in &mut self.nodes {
            let Some(child) = &mut node.child else { continue };
            if let Ok(Some(status)) = child.try_wait() {
                let crash_point = node.failpoints.is_some() && status.code() == Some(CRASH_POINT_EXIT);
                out.push(UnexpectedExit { node: node.index, status: status.to_string(), crash_point });
                node.child = None;
                node.paused = false;
            }
        }
        out
    }

    /// Every node running, resumed and reachable, every link healed.
    /// Every node running without an armed crash point, resumed, and every
    /// link healed. Nodes are all resumed before any is started, so that a
    /// start that fails leaves none stopped.
    /// Ballast files are deleted first, so that a node that exited on its
    /// full disk starts again with space.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.free_disks();
        self.network.heal();
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
        }
        let mut failed = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].failpoints.is_some() {
                self.kill(i).await;
            }
            if !self.nodes[i].running() {
                if let Err(e) = self.spawn(i, None).await {
                    failed.push(format!("{e:#}"));
                }
            }
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }

    /// Which node leads each shard, as the nodes report it (the most recent
    /// answer wins; shards nobody claims are missing).
    pub async fn leaders(&self) -> BTreeMap<u32, u64> {
        let mut out = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.running() && !n.paused) {
            let Ok(Ok(mut admin)) = tokio::time::timeout(Duration::from_secs(2), admin(n)).await else { continue };
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), admin.get_cluster(pb::GetClusterRequest {})).await else {
                continue;
            };
            for s in status.into_inner().shards {
                if s.state == "Leader" {
                    out.insert(s.shard, s.leader_id);
                }
            }
        }
        out
    }

    /// Fills node `i`'s tmpfs with a ballast file beside its data
    /// directory, until no byte is free; returns the ballast's size.
    pub async fn fill_disk(&self, i: usize) -> anyhow::Result<u64> {
        let node = &self.nodes[i];
        let (Some(mount), Some(ballast)) = (node.mount.clone(), node.ballast()) else {
            bail!("node {} has no tmpfs of its own to fill (disk-full faults need one)", node.id)
        };
        tokio::task::spawn_blocking(move || fill(&mount, &ballast))
            .await?
            .with_context(|| format!("filling node {}'s tmpfs", self.nodes[i].id))
    }

    /// Deletes every ballast file; returns the nodes whose disk was full.
    pub fn free_disks(&mut self) -> Vec<usize> {
        let mut freed = Vec::new();
        for node in &self.nodes {
            let Some(ballast) = node.ballast() else { continue };
            match std::fs::remove_file(&ballast) {
                Ok(()) => freed.push(node.index),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(node = node.id, error = %e, "cannot delete the ballast"),
            }
        }
        freed
    }

    /// Kills every node. Tmpfs data directories are copied to the run
    /// directory's file system (`nodeN.fs/data` again once unmounted), so
    /// that they are kept with the logs; a copy or an unmount that fails is
    /// logged and skipped.
    pub async fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i).await;
        }
        self.free_disks();
        for node in &self.nodes {
            let Some(at) = &node.mount else { continue };
            if let Err(e) = unmount_keeping(at, &node.dir) {
                tracing::warn!(node = node.id, at = %at.display(), error = format!("{e:#}"), "cannot unmount the tmpfs");
            }
        }
    }
}

/// Whether [`private_mount_namespace`] succeeded.
static PRIVATE_MOUNTS: AtomicBool = AtomicBool::new(false);

/// Moves this process into a mount namespace of its own, with every mount
/// private, so that the tmpfs it mounts for its nodes are seen by it and
/// its children only and vanish when it exits, however it exits. Must run
/// before any thread starts (the kernel refuses to unshare a threaded
/// process's mounts), so before the tokio runtime is built. Needs root.
pub fn private_mount_namespace() -> anyhow::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).context("making / recursively private")?;
    PRIVATE_MOUNTS.store(true, Ordering::SeqCst);
    Ok(())
}

/// Fills the file system of `mount` with `ballast`: one allocation of what
/// is free (again if the node wrote meanwhile), then zeros until ENOSPC.
fn fill(mount: &Path, ballast: &Path) -> anyhow::Result<u64> {
    let mut file = std::fs::File::create(ballast).with_context(|| format!("creating {}", ballast.display()))?;
    let mut len = 0u64;
    for _ in 0..8 {
        let st = statvfs(mount)?;
        let free: u64 = st.blocks_available() * st.fragment_size();
        if free == 0 {
            break;
        }
        match fallocate(&file, FallocateFlags::empty(), len as i64, free as i64) {
            Ok(()) => len += free,
            Err(Errno::ENOSPC) => {}
            Err(e) => return Err(e).context("fallocate"),
        }
    }
    file.seek(SeekFrom::Start(len))?;
    let zeros = [0u8; 4096];
    loop {
        match file.write(&zeros) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(Errno::ENOSPC as i32) => break,
            Err(e) => return Err(e).context("writing the ballast"),
        }
    }
    Ok(len)
}

/// Unmounts the tmpfs at `at` (lazily, should something still hold it),
/// first copying the data directory `data` in it to the disk, and back to
/// the same path once the mount point is a plain directory again.
fn unmount_keeping(at: &Path, data: &Path) -> anyhow::Result<()> {
    let copy = at.with_extension("fs-data");
    let kept = data.exists()
        && match copy_dir(data, &copy) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(from = %data.display(), error = %e, "cannot copy a data directory off its tmpfs");
                false
            }
        };
    umount2(at, MntFlags::MNT_DETACH).context("umount")?;
    if kept {
        std::fs::rename(&copy, data).context("moving the data directory back")?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

impl Drop for Cluster {
    /// Kills what still runs (a paused process dies of SIGKILL too).
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // A node process is killed when dropped.
            node.child = None;
        }
    }
}

/// Exit status of a node stopped at a crash point (`idgraph_node::crash`).
pub const CRASH_POINT_EXIT: i32 = 86;

pub async fn admin(n: &Node) -> Result<pb::admin_client::AdminClient<Channel>, tonic::transport::Error> {
    Ok(pb::admin_client::AdminClient::new(channel(&n.endpoint()).await?))
}

pub async fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())?.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect().await
}

/// A channel that connects on first use (and reconnects after a restart).
pub fn lazy_channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The node binary beside the harness's own (both built into one target
/// directory), unless given.
pub fn default_node_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test binaries live one level deeper, in deps/.
    let dir = if dir.ends_with("deps") { dir.parent().map(Path::to_path_buf).unwrap_or(dir) } else { dir };
    dir.join("idgraph-node")
}
