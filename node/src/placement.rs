//! The I/O shell around [`idgraph_core::meta`]: every node keeps its replicas in
//! line with the cluster map, and the node leading the metadata group
//! carries out the replica moves the map plans.
//!
//! One task per node ([`spawn`]) does, twice a second:
//! 1. read the map from the metadata group (linearizable) into the
//!    router's copy; on a cluster not bootstrapped yet, the metadata
//!    leader proposes the initial map;
//! 2. refresh what the map says of this node (address, rule-set version);
//!    on the metadata leader of a cluster without a rule set yet, store
//!    this node's rules as the cluster's first version;
//! 3. open the replicas the map gives this node, and discard those it no
//!    longer lists while no move of their group is under way;
//! 4. on the metadata leader only: resume a recorded move, or plan and
//!    carry out new ones ([`ClusterMap::next_move`]), and forget drained
//!    nodes; every few seconds, move one leadership from the node leading
//!    most groups to one leading fewest ([`ClusterMap::next_leader_transfer`]).
//!
//! Every step is safe to repeat and to interrupt: a move's steps are
//! recorded in the map before and after the Raft membership change they
//! bracket (see [`idgraph_core::meta`]).

use crate::error::RequestError;
use crate::raft::MembershipChange;
use crate::router::ShardRouter;
use crate::shard::SupervisorMsg;
use idgraph_core::meta::{ClusterMap, MetaCommand, ReplicaMove};
use idgraph_core::model::GroupId;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, instrument, warn};

/// What the placement task of a node needs.
pub struct Placement {
    pub router: ShardRouter,
    pub supervisor: ActorRef<SupervisorMsg>,
    /// The map to bootstrap a new static cluster with (none when joining).
    pub bootstrap: Option<ClusterMap>,
    /// The address this node advertises.
    pub addr: String,
    /// Whether to even out leaderships (on the metadata leader).
    pub balance_leaders: bool,
}

/// How often a node looks at the cluster map.
const EVERY: Duration = Duration::from_millis(500);
/// Every this many rounds the metadata leader evens out leaderships.
const LEADER_BALANCE_ROUNDS: u64 = 10;
/// Moves the metadata leader carries out before it reads the map anew.
const MOVES_PER_ROUND: usize = 64;

pub fn spawn(p: Placement) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u64.. {
            every.tick().await;
            if let Err(e) = p.round(round % LEADER_BALANCE_ROUNDS == LEADER_BALANCE_ROUNDS - 1).await {
                tracing::debug!(error = %e, "cluster map round did not complete; will retry");
            }
        }
    })
}

impl Placement {
    fn me(&self) -> u64 {
        self.router.node_id()
    }

    /// Whether this node's replica of the metadata group leads it.
    fn leads_meta(&self) -> bool {
        self.router.local_leader(GroupId::Meta) == Some(self.me())
    }

    #[instrument(skip_all, fields(node = self.me()))]
    async fn round(&self, balance_leaders: bool) -> Result<(), RequestError> {
        let map = self.router.read_cluster().await?;
        if !map.is_bootstrapped() {
            if let (Some(initial), true) = (&self.bootstrap, self.leads_meta()) {
                info!(nodes = initial.nodes.len(), shards = initial.shard_count, "bootstrapping the cluster map");
                self.router.change_cluster(MetaCommand::Bootstrap(initial.clone())).await?;
            }
            return Ok(());
        }
        if map.active_rules.is_empty() && self.leads_meta() {
            let rules = self.router.rules();
            info!(rule_version = rules.version(), "seeding the cluster's rule set");
            self.router.change_cluster(MetaCommand::PutRuleSet { toml: rules.source().to_string(), seed: true }).await?;
        }
        let rule_version = self.router.rules().version().to_string();
        if let Some(entry) = map.nodes.get(&self.me()) {
            if entry.addr != self.addr || entry.rule_version != rule_version {
                let cmd = MetaCommand::NodeUp { node_id: self.me(), addr: self.addr.clone(), rule_version, create: false };
                self.router.change_cluster(cmd).await?;
            }
        }
        self.converge(&map).await;
        if self.leads_meta() {
            let map = self.drive(map).await?;
            if balance_leaders && self.balance_leaders {
                self.balance_leaders(&map).await?;
            }
        }
        Ok(())
    }

    /// Moves one group's leadership from the node leading most groups to
    /// a replica leading fewest, when they differ by more than one.
    async fn balance_leaders(&self, map: &ClusterMap) -> Result<(), RequestError> {
        let mut leaders = std::collections::BTreeMap::new();
        for group in map.groups.keys() {
            if let Some(leader) = self.router.leader_of(*group).await {
                leaders.insert(*group, leader);
            }
        }
        if let Some((group, to)) = map.next_leader_transfer(&leaders) {
            info!(%group, to, "moving a leadership to even out leaders");
            self.router.transfer_leader(group, to).await?;
        }
        Ok(())
    }

    /// Opens and discards local replicas as the map says.
    async fn converge(&self, map: &ClusterMap) {
        let mine = map.groups_of(self.me());
        for group in &mine {
            if !self.router.hosts(*group) {
                if let Err(e) = self.supervise(SupervisorMsg::Open, *group).await {
                    warn!(%group, error = %e, "opening a replica failed; will retry");
                }
            }
        }
        for group in self.router.hosted() {
            if !mine.contains(&group) && !map.moves.contains_key(&group) {
                if let Err(e) = self.supervise(SupervisorMsg::Discard, group).await {
                    warn!(%group, error = %e, "discarding a replica failed; will retry");
                }
            }
        }
    }

    async fn supervise(
        &self,
        msg: fn(idgraph_core::model::GroupId, ractor::RpcReplyPort<Result<(), String>>) -> SupervisorMsg,
        group: idgraph_core::model::GroupId,
    ) -> Result<(), String> {
        match self.supervisor.call(|port| msg(group, port), Some(Duration::from_secs(30))).await {
            Ok(CallResult::Success(r)) => r,
            Ok(_) => Err("the supervisor did not answer".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// On the metadata leader: moves replicas towards the placement goal.
    async fn drive(&self, mut map: ClusterMap) -> Result<ClusterMap, RequestError> {
        for _ in 0..MOVES_PER_ROUND {
            let mv = match map.moves.values().next().copied().or_else(|| map.next_move()) {
                Some(mv) => mv,
                None => break,
            };
            if !self.leads_meta() {
                return Ok(map);
            }
            map = self.carry_out(mv).await?;
        }
        for node_id in map.drained() {
            info!(node_id, "node drained; forgetting it");
            map = self.router.change_cluster(MetaCommand::Forget { node_id }).await?;
        }
        Ok(map)
    }

    /// The three steps of one move (see [`idgraph_core::meta`]); each may have
    /// been done before.
    #[instrument(skip_all, fields(group = %mv.group, add = ?mv.add, remove = ?mv.remove))]
    async fn carry_out(&self, mv: ReplicaMove) -> Result<ClusterMap, RequestError> {
        let map = self.router.change_cluster(MetaCommand::BeginMove(mv)).await?;
        crate::crash::crash_point("placement::after-begin-move");
        let add = match mv.add {
            Some(id) => match map.nodes.get(&id) {
                Some(entry) => Some((id, entry.addr.clone())),
                None => return Err(RequestError::Internal(format!("node {id} of a move is not in the cluster map"))),
            },
            None => None,
        };
        self.router.change_membership(mv.group, MembershipChange { add, remove: mv.remove }).await?;
        crate::crash::crash_point("placement::after-membership-change");
        let map = self.router.change_cluster(MetaCommand::FinishMove { group: mv.group }).await?;
        info!(version = map.version, "replica moved");
        Ok(map)
    }
}
