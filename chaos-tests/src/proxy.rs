//! The fault-injecting TCP proxy between nodes.
//!
//! Every ordered pair of nodes (from, to) gets its own [`Link`]: a listener
//! on loopback that node `from` dials instead of `to` (the harness starts
//! each node with `peer_routes` pointing at its links), forwarding bytes to
//! `to`'s real address. A link is one direction of reachability: cutting it
//! closes the connections it carries and refuses new ones, so that node
//! `from` can no longer reach `to` (its Raft messages, forwarded requests)
//! while `to` may still reach `from` through the opposite link. Latency is
//! added per chunk in both byte directions of a connection, preserving
//! order without throttling throughput.
//!
//! Client traffic of the workload goes straight to the nodes: a partition
//! here separates nodes from each other, as a switch failure between racks
//! would, while clients on either side keep talking to their node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a link does to the traffic it carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Cut: connections are closed and new ones refused.
    pub cut: bool,
    /// Added one-way delay per chunk, in milliseconds.
    pub delay_ms: u64,
}

/// One direction of reachability between two nodes.
pub struct Link {
    pub from: usize,
    pub to: usize,
    /// Where `from` dials.
    pub addr: SocketAddr,
    state: watch::Sender<LinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(from: usize, to: usize, target: SocketAddr) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, watcher) = watch::channel(LinkState::default());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                if watcher.borrow().cut {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(carry(inbound, target, watcher.clone()));
            }
        });
        Ok(Link { from, to, addr, state, task })
    }

    pub fn set(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Carries one connection until either side closes it or the link is cut.
async fn carry(inbound: TcpStream, target: SocketAddr, mut state: watch::Receiver<LinkState>) {
    let Ok(outbound) = TcpStream::connect(target).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let forward = pipe(in_read, out_write, state.clone());
    let backward = pipe(out_read, in_write, state.clone());
    let cut = async move {
        while state.changed().await.is_ok() {
            if state.borrow().cut {
                return;
            }
        }
    };
    // Dropping the halves closes both sockets.
    tokio::select! {
        _ = forward => {}
        _ = backward => {}
        _ = cut => {}
    }
}

/// Copies bytes one way, each chunk held back by the link's current delay.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, state: watch::Receiver<LinkState>) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_millis(state.borrow().delay_ms);
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what the reader queued before its end of stream;
    // a writer that fails drops the queue, which stops the reader.
    tokio::join!(reader, writer);
}

/// All links of a cluster of `n` nodes, indexed by (from, to).
pub struct Network {
    pub links: Vec<Arc<Link>>,
}

impl Network {
    /// Starts a link for every ordered pair of distinct nodes.
    pub async fn start(targets: &[SocketAddr]) -> std::io::Result<Network> {
        let mut links = Vec::new();
        for from in 0..targets.len() {
            for (to, target) in targets.iter().enumerate() {
                if from != to {
                    links.push(Arc::new(Link::start(from, to, *target).await?));
                }
            }
        }
        Ok(Network { links })
    }

    pub fn link(&self, from: usize, to: usize) -> Option<&Link> {
        self.links.iter().find(|l| l.from == from && l.to == to).map(|l| &**l)
    }

    /// Cuts both directions between every node of `a` and every node of `b`.
    pub fn cut_between(&self, a: &[usize], b: &[usize]) {
        for l in &self.links {
            if (a.contains(&l.from) && b.contains(&l.to)) || (b.contains(&l.from) && a.contains(&l.to)) {
                l.set(LinkState { cut: true, ..l.state() });
            }
        }
    }

    /// Adds `delay_ms` to every link.
    pub fn slow_all(&self, delay_ms: u64) {
        for l in &self.links {
            l.set(LinkState { delay_ms, ..l.state() });
        }
    }

    /// Every link back to normal.
    pub fn heal(&self) {
        for l in &self.links {
            l.set(LinkState::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    #[tokio::test]
    async fn a_link_carries_bytes_until_cut_and_again_after_healing() {
        let target = echo_server().await;
        let link = Link::start(0, 1, target).await.unwrap();
        let mut s = TcpStream::connect(link.addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello").await.unwrap(), b"hello");

        link.set(LinkState { cut: true, delay_ms: 0 });
        // The open connection is closed...
        let res = tokio::time::timeout(Duration::from_secs(5), round_trip(&mut s, b"again")).await.expect("a cut link answers at once");
        assert!(res.is_err(), "a cut link still carried bytes: {res:?}");
        // ...and a new one gets nothing through.
        let mut s2 = TcpStream::connect(link.addr).await.unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), round_trip(&mut s2, b"new")).await.expect("a cut link answers at once");
        assert!(res.is_err(), "a cut link accepted a new connection: {res:?}");

        link.set(LinkState::default());
        let mut s3 = TcpStream::connect(link.addr).await.unwrap();
        assert_eq!(round_trip(&mut s3, b"healed").await.unwrap(), b"healed");
    }

    #[tokio::test]
    async fn a_slow_link_delays_each_direction() {
        let target = echo_server().await;
        let link = Link::start(0, 1, target).await.unwrap();
        link.set(LinkState { cut: false, delay_ms: 150 });
        let mut s = TcpStream::connect(link.addr).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut s, b"slow").await.unwrap(), b"slow");
        // A lower bound only: the delay is added on the way there and back.
        assert!(started.elapsed() >= Duration::from_millis(300), "round trip took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn cutting_between_groups_leaves_other_links_up() {
        let targets = vec![echo_server().await, echo_server().await, echo_server().await];
        let net = Network::start(&targets).await.unwrap();
        assert_eq!(net.links.len(), 6);
        net.cut_between(&[0], &[1, 2]);
        for l in &net.links {
            assert_eq!(l.state().cut, l.from == 0 || l.to == 0, "link {}->{}", l.from, l.to);
        }
        net.heal();
        assert!(net.links.iter().all(|l| l.state() == LinkState::default()));
        let _ = net.link(1, 2).expect("link 1->2");
    }
}
