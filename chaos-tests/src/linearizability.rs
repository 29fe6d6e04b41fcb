//! Linearizability checking of recorded client histories.
//!
//! **What is checked.** A history is a set of operations. A client invokes each one at a call time and, if it got an
//! answer, sees it complete at a return time. The history is linearizable with respect to a sequential [`Model`] when
//! each operation can be given one instant inside its own interval such that applying the operations one at a time,
//! in the order of those instants, to the model's initial state yields exactly the answers the clients observed. The
//! real-time constraint is what makes this stronger than serializability: if `a` returned before `b` was called, `a`
//! comes first. Ties count as overlap: `a` is forced before `b` only when `a`'s return is strictly earlier than
//! `b`'s call. This is the permissive choice. A history is never flagged just because two clock readings are equal.
//! A return time earlier than its own call (a broken clock) is treated as equal to the call.
//!
//! **How.** [`check`] is the search of Wing and Gong with Lowe's memoisation, as made popular by Porcupine. Calls
//! and returns are merged into one list sorted by time, with calls before returns at equal times. The search walks
//! the list from its head. At a call entry it tries to linearize that operation now. If the model accepts the
//! operation's answer from the current state, and the pair (set of operations linearized so far, resulting state)
//! has not been explored before, the search removes the operation from the list, pushes it on a stack and restarts
//! at the head. Reaching a return entry means an operation's deadline passed before it was placed. The search then
//! undoes the latest choice and tries the next candidate after it. The history is linearizable once every completed
//! operation is placed. It is not linearizable when backtracking empties the stack. The memo makes this practical:
//! two orders that reach the same set in the same state have the same future, so only one of them is explored.
//!
//! **Unknown outcomes.** A request that timed out or lost its connection may have taken effect at any moment after
//! it was sent, or never. Such an operation has no return entry: its deadline is infinite. The search may place it
//! anywhere after its call, and never has to place it. The search succeeds once all operations with a known answer
//! are placed. That is the same as placing the remaining ones at the very end, where no later operation can observe
//! them. For an unknown operation the model is called with `output = None` and must accept whatever it could have
//! done: an unacknowledged write applies its effect, and an unanswered read changes nothing. [`check_graph`] drops
//! unanswered reads before the search, because they carry no information and only widen the search.
//!
//! **The identity-graph model.** The checked workload has no limits and no unmerges, so the service's graph is a pure
//! union. Each acknowledged Identify or Merge (a [`GraphInput::Link`]) says that its identifiers now share one
//! profile. A read ([`GraphInput::Read`]) of an identifier must return exactly that identifier's connected component
//! in the graph whose edges are the links applied so far. If no applied link mentions the identifier, the read must
//! return NOT_FOUND. [`IdentityModel`] stores a state as the partition itself (a [`Partition`]: one label per
//! identifier), not as the links that made it, so two orders of links that make the same components reach the same
//! memo entry.
//!
//! **Pruning inert operations.** A read changes no state, and in this model a link whose identifiers already share a
//! component changes nothing either, then or ever after, because components only grow. [`Model::inert`] names such
//! operations. At each new configuration the search first looks among the operations it may place now for an inert
//! one that the model accepts, and places it at once, without trying it anywhere else: any linearization that places
//! it later (or, for an unknown outcome, never) stays one when it is moved here, since it leaves every state on the
//! way as it was. So when that configuration fails, the one before it fails too, and backtracking goes on past it.
//! This removes the two kinds of choice that made long histories explode: where to put a read, and whether an
//! unacknowledged link that a later link made redundant ever happened.
//!
//! **Partitioning.** Callers check each group of identifiers separately, and [`check_graph`] splits a group's history
//! further, into the connected components of the graph made by all its links, acknowledged or not. This is sound
//! because linearizability is local (Herlihy and Wing): a history over independent objects is linearizable if and only
//! if each object's sub-history is. Links of different components never touch the same identifiers, so the correct
//! answer to a read depends only on the links of its identifier's component, and each component is an independent
//! object. A buggy service could still leak across components, with a read that returns an identifier of another
//! one. That answer is caught, because the component's model has never seen that identifier.
//!
//! **Cost and the step budget.** Linearizability checking is NP-complete in general (Gibbons and Korach), and this
//! search is exponential in the worst case. The memo holds at most one entry per reachable (linearized set, state)
//! pair. With at most `c` operations in flight at once, there are roughly `n · 2^c` such sets. Histories from a few
//! clients with short timeouts stay far below that bound. Unknown-outcome links are the expensive part: they never
//! expire, so each one stays a candidate until the end of the history, or until it turns inert. One step is one
//! call of the model. It costs at most one model step plus hashing one memo key, which is `n / 64` words plus the
//! state. When `max_steps` runs out, the answer is [`Verdict::Unknown`]. That is not a pass: the checker fails the
//! group and names it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

/// A sequential specification: the object the history is checked against.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;

    fn init(&self) -> Self::State;

    /// The state after `input` was applied and answered `output`; None when the model could not have answered that.
    /// `output` is None for an operation whose outcome is unknown (it may or may not have taken effect).
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;

    /// Whether `input` changes neither `state` nor any state reachable from it. The search places an inert operation
    /// that the model accepts as soon as it may, and never tries it anywhere else (see the module doc). Reads are inert
    /// in every model; a write is inert only in a model whose states only grow, once it can add nothing. The default,
    /// nothing is inert, turns the pruning off.
    fn inert(&self, _state: &Self::State, _input: &Self::Input) -> bool {
        false
    }
}

/// One client operation of a recorded history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation<I, O> {
    pub client: usize,
    pub input: I,
    /// Invocation time (any monotonic unit, e.g. microseconds since the run started).
    pub call: u64,
    /// Completion time and answer; None = outcome unknown (timeout, connection lost): the op may take effect at any
    /// time after `call`, or never.
    pub completion: Option<(u64, O)>,
}

/// The outcome of [`check`]. Operation indices refer to the history that was passed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Verdict {
    Linearizable,
    NotLinearizable {
        /// The longest sequence of operations the search managed to linearize, in linearization order.
        longest_prefix: Vec<usize>,
        /// The completed operation whose return the search reached right after that prefix without having placed
        /// it: no order of the operations still pending there let it take effect before its deadline.
        unplaceable: usize,
    },
    /// The step budget ran out before the search reached a verdict.
    Unknown,
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

/// Checks `history` against `model`, visiting at most `max_steps` entries of the event list.
pub fn check<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>], max_steps: u64) -> Verdict {
    let ops: Vec<&Operation<M::Input, M::Output>> = history.iter().collect();
    search(model, &ops, max_steps).0
}

/// A fixed-size set of small integers, hashed cheaply as whole words.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bits(Box<[u64]>);

impl Bits {
    fn new(len: usize) -> Self {
        Bits(vec![0; len.div_ceil(64)].into_boxed_slice())
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Call,
    Return,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    kind: Kind,
}

/// The time-ordered call/return entries as a doubly linked list. Operations are taken out and put back in LIFO
/// order. Node 0 is the head sentinel, nodes `1..=len` are the entries, and node `len + 1` is the tail sentinel.
struct Entries {
    entries: Vec<Entry>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_node: Vec<usize>,
    return_node: Vec<Option<usize>>,
}

impl Entries {
    fn new<I, O>(ops: &[&Operation<I, O>]) -> Self {
        let mut timed: Vec<(u64, Kind, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            timed.push((op.call, Kind::Call, i));
            if let Some((ret, _)) = &op.completion {
                timed.push(((*ret).max(op.call), Kind::Return, i));
            }
        }
        // Calls sort before returns at equal times: an op returning when another is called overlaps it.
        timed.sort_unstable();
        let len = timed.len();
        let mut call_node = vec![0; ops.len()];
        let mut return_node = vec![None; ops.len()];
        let entries = timed
            .iter()
            .enumerate()
            .map(|(i, &(_, kind, op))| {
                match kind {
                    Kind::Call => call_node[op] = i + 1,
                    Kind::Return => return_node[op] = Some(i + 1),
                }
                Entry { op, kind }
            })
            .collect();
        Entries {
            entries,
            next: (1..=len + 2).collect(),
            prev: (0..len + 2).map(|n| n.saturating_sub(1)).collect(),
            call_node,
            return_node,
        }
    }

    fn first(&self) -> usize {
        self.next[0]
    }

    fn next(&self, node: usize) -> usize {
        self.next[node]
    }

    /// The entry at `node`; None for the sentinels.
    fn get(&self, node: usize) -> Option<Entry> {
        node.checked_sub(1).and_then(|i| self.entries.get(i)).copied()
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        self.prev[n] = node;
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_node[op]);
        if let Some(ret) = self.return_node[op] {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, op: usize) {
        if let Some(ret) = self.return_node[op] {
            self.relink(ret);
        }
        self.relink(self.call_node[op]);
    }
}

/// One placed operation on the search's stack.
struct Placed<S> {
    op: usize,
    /// The state before it.
    before: S,
    /// Placed because it was inert: backtracking over it backtracks over the choice before it too.
    forced: bool,
}

/// The search's working state: the list of entries still to place, the current state and the choices made.
struct Search<'a, M: Model> {
    model: &'a M,
    ops: &'a [&'a Operation<M::Input, M::Output>],
    list: Entries,
    state: M::State,
    linearized: Bits,
    seen: HashSet<(Bits, M::State)>,
    stack: Vec<Placed<M::State>>,
    /// Completed operations not placed yet.
    unplaced: usize,
    longest: Option<(Vec<usize>, usize)>,
    steps: u64,
}

impl<M: Model> Search<'_, M> {
    fn output(&self, op: usize) -> Option<&M::Output> {
        self.ops[op].completion.as_ref().map(|(_, out)| out)
    }

    /// An inert operation the model accepts now, among those that may be placed now: the calls before the first
    /// return entry.
    fn inert_candidate(&mut self) -> Option<(usize, M::State)> {
        let mut node = self.list.first();
        while let Some(Entry { op, kind: Kind::Call }) = self.list.get(node) {
            if self.model.inert(&self.state, &self.ops[op].input) {
                self.steps += 1;
                if let Some(next) = self.model.step(&self.state, &self.ops[op].input, self.output(op)) {
                    return Some((op, next));
                }
            }
            node = self.list.next(node);
        }
        None
    }

    /// Places `op`, reaching `next`, unless that configuration was explored before. Returns whether it was placed.
    fn place(&mut self, op: usize, next: M::State, forced: bool) -> bool {
        self.linearized.insert(op);
        if !self.seen.insert((self.linearized.clone(), next.clone())) {
            self.linearized.remove(op);
            return false;
        }
        let before = std::mem::replace(&mut self.state, next);
        self.stack.push(Placed { op, before, forced });
        self.list.lift(op);
        if self.ops[op].completion.is_some() {
            self.unplaced -= 1;
        }
        true
    }

    fn not_linearizable(&mut self) -> Verdict {
        let (longest_prefix, unplaceable) = self.longest.take().unwrap_or_default();
        Verdict::NotLinearizable { longest_prefix, unplaceable }
    }

    /// Undoes the latest free choice (and the forced placements after it), `late` being the operation whose deadline
    /// passed, if one did. Returns where the walk goes on, or None when no choice is left: not linearizable.
    fn backtrack(&mut self, late: Option<usize>) -> Option<usize> {
        if let Some(late) = late {
            if self.longest.as_ref().is_none_or(|(prefix, _)| self.stack.len() > prefix.len()) {
                self.longest = Some((self.stack.iter().map(|p| p.op).collect(), late));
            }
        }
        loop {
            let placed = self.stack.pop()?;
            self.list.unlift(placed.op);
            self.linearized.remove(placed.op);
            self.state = placed.before;
            if self.ops[placed.op].completion.is_some() {
                self.unplaced += 1;
            }
            if !placed.forced {
                return Some(self.list.next(self.list.call_node[placed.op]));
            }
        }
    }
}

/// The search over `ops`; also returns the steps it took.
fn search<M: Model>(model: &M, ops: &[&Operation<M::Input, M::Output>], max_steps: u64) -> (Verdict, u64) {
    let unplaced = ops.iter().filter(|op| op.completion.is_some()).count();
    if unplaced == 0 {
        return (Verdict::Linearizable, 0);
    }
    let mut s = Search {
        model,
        ops,
        list: Entries::new(ops),
        state: model.init(),
        linearized: Bits::new(ops.len()),
        seen: HashSet::new(),
        stack: Vec::new(),
        unplaced,
        longest: None,
        steps: 0,
    };
    let mut cursor = s.list.first();
    // At a configuration not yet scanned for an inert operation.
    let mut fresh = true;
    loop {
        if s.steps >= max_steps {
            return (Verdict::Unknown, s.steps);
        }
        if fresh {
            fresh = false;
            if let Some((op, next)) = s.inert_candidate() {
                // Placing it here is as good as anywhere, so if that configuration failed before, this one fails.
                if !s.place(op, next, true) {
                    match s.backtrack(None) {
                        Some(next) => cursor = next,
                        None => return (s.not_linearizable(), s.steps),
                    }
                    continue;
                }
                if s.unplaced == 0 {
                    return (Verdict::Linearizable, s.steps);
                }
                cursor = s.list.first();
                fresh = true;
                continue;
            }
        }
        let late = match s.list.get(cursor) {
            Some(Entry { op, kind: Kind::Call }) => {
                s.steps += 1;
                let placed = match s.model.step(&s.state, &s.ops[op].input, s.output(op)) {
                    Some(next) => s.place(op, next, false),
                    None => false,
                };
                if !placed {
                    cursor = s.list.next(cursor);
                } else if s.unplaced == 0 {
                    return (Verdict::Linearizable, s.steps);
                } else {
                    cursor = s.list.first();
                    fresh = true;
                }
                continue;
            }
            // A deadline passed, so undo the latest choice. The tail is never reached while a completed op is
            // unplaced, because every remaining return entry lies after the cursor. It is handled the same way.
            reached => reached.map(|entry| entry.op),
        };
        match s.backtrack(late) {
            Some(next) => cursor = next,
            None => return (s.not_linearizable(), s.steps),
        }
    }
}

/// An operation on the identity graph in the checked workload (no limits, no unmerges).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GraphInput {
    /// An Identify event or a Merge of two identifiers' profiles: afterwards all `ids` are in one profile (and exist).
    Link { ids: Vec<String> },
    /// GetProfile by one identifier (linearizable read).
    Read { id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GraphOutput {
    /// Write acknowledged.
    Linked,
    /// Read answered: None = NOT_FOUND, Some(set) = the identifiers of the profile the id belongs to.
    Profile(Option<BTreeSet<String>>),
}

/// The identity graph as a pure union of links, over the identifiers of one history (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct IdentityModel {
    /// Every identifier named by some link, numbered densely.
    ids: HashMap<String, usize>,
}

/// A state of [`IdentityModel`]: the partition of the identifiers into profiles. Entry `i` is 0 while no applied
/// link names identifier `i`, and otherwise one more than the smallest identifier number of its component. Every
/// order of links that makes the same components makes the same state, so the search's memo merges them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Partition(Box<[u32]>);

impl IdentityModel {
    /// Numbers the identifiers that the links of `history` name. The model knows only these: a link naming another
    /// identifier is rejected by [`Model::step`], and a read of one must answer NOT_FOUND.
    pub fn new<'a>(history: impl IntoIterator<Item = &'a Operation<GraphInput, GraphOutput>>) -> Self {
        let mut model = IdentityModel::default();
        for op in history {
            if let GraphInput::Link { ids } = &op.input {
                for id in ids {
                    let next = model.ids.len();
                    model.ids.entry(id.clone()).or_insert(next);
                }
            }
        }
        model
    }

    fn numbers(&self, ids: &[String]) -> Option<Vec<usize>> {
        ids.iter().map(|id| self.ids.get(id).copied()).collect()
    }

    /// Whether every identifier of `members` is already in one component of `state`.
    fn joined(state: &Partition, members: &[usize]) -> bool {
        members.first().is_none_or(|&first| state.0[first] != 0 && members.iter().all(|&m| state.0[m] == state.0[first]))
    }

    /// `state` with `members` and every component they touch joined into one.
    fn link(state: &Partition, members: &[usize]) -> Partition {
        let touched: Vec<u32> = members.iter().map(|&m| state.0[m]).filter(|&label| label != 0).collect();
        let mut next = state.clone();
        let mut label = 0;
        for (i, slot) in next.0.iter_mut().enumerate() {
            if members.contains(&i) || (*slot != 0 && touched.contains(slot)) {
                if label == 0 {
                    label = i as u32 + 1;
                }
                *slot = label;
            }
        }
        next
    }

    /// Whether a read of `id` in `state` may answer `answer`.
    fn answers(&self, state: &Partition, id: &str, answer: Option<&BTreeSet<String>>) -> bool {
        let label = self.ids.get(id).map_or(0, |&target| state.0[target]);
        let Some(members) = answer else {
            return label == 0;
        };
        label != 0
            && members.len() == state.0.iter().filter(|&&l| l == label).count()
            && members.iter().all(|member| self.ids.get(member).is_some_and(|&m| state.0[m] == label))
    }
}

impl Model for IdentityModel {
    type State = Partition;
    type Input = GraphInput;
    type Output = GraphOutput;

    fn init(&self) -> Partition {
        Partition(vec![0; self.ids.len()].into_boxed_slice())
    }

    fn step(&self, state: &Partition, input: &GraphInput, output: Option<&GraphOutput>) -> Option<Partition> {
        match (input, output) {
            (GraphInput::Link { ids }, None | Some(GraphOutput::Linked)) => Some(Self::link(state, &self.numbers(ids)?)),
            (GraphInput::Read { .. }, None) => Some(state.clone()),
            (GraphInput::Read { id }, Some(GraphOutput::Profile(answer))) => {
                self.answers(state, id, answer.as_ref()).then(|| state.clone())
            }
            (GraphInput::Link { .. }, Some(GraphOutput::Profile(_))) | (GraphInput::Read { .. }, Some(GraphOutput::Linked)) => None,
        }
    }

    /// Components only grow: a link between identifiers already in one component adds nothing, now or later.
    fn inert(&self, state: &Partition, input: &GraphInput) -> bool {
        match input {
            GraphInput::Read { .. } => true,
            GraphInput::Link { ids } => self.numbers(ids).is_some_and(|members| Self::joined(state, &members)),
        }
    }
}

/// What [`check_graph`] found, and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphCheck {
    pub verdict: Verdict,
    /// The independent parts the history was split into: one per connected component of all its links.
    pub parts: usize,
    /// Operations of the largest part.
    pub largest_part: usize,
    /// Search steps over all parts.
    pub steps: u64,
    /// With [`Verdict::Unknown`]: the operations of the part whose search ran out of steps.
    pub undecided_part: Option<usize>,
}

/// Checks one partition of an identity-graph history against [`IdentityModel`]. Reads with an unknown outcome are
/// dropped first. The rest is split into the connected components of all its links (acknowledged or not), each an
/// independent object checked on its own, with `max_steps` for all of them together. Indices in the verdict still
/// refer to `history`.
pub fn check_graph(history: &[Operation<GraphInput, GraphOutput>], max_steps: u64) -> GraphCheck {
    // Union-find over the identifiers that the operations name, joined by every link.
    let mut numbers: HashMap<&str, usize> = HashMap::new();
    fn number<'a>(id: &'a str, numbers: &mut HashMap<&'a str, usize>) -> usize {
        let next = numbers.len();
        *numbers.entry(id).or_insert(next)
    }
    let mut kept: Vec<(usize, Option<usize>)> = Vec::new();
    let mut pairs = Vec::new();
    for (i, op) in history.iter().enumerate() {
        let first = match &op.input {
            GraphInput::Read { .. } if op.completion.is_none() => continue,
            GraphInput::Read { id } => Some(number(id, &mut numbers)),
            GraphInput::Link { ids } => {
                let members: Vec<usize> = ids.iter().map(|id| number(id, &mut numbers)).collect();
                pairs.extend(members.windows(2).map(|w| (w[0], w[1])));
                members.first().copied()
            }
        };
        kept.push((i, first));
    }
    let mut components = Components::new(numbers.len());
    for (a, b) in pairs {
        components.union(a, b);
    }
    // Parts in order of their first operation; a link naming nobody is a part of its own.
    let mut parts: Vec<Vec<usize>> = Vec::new();
    let mut part_of: HashMap<Option<usize>, usize> = HashMap::new();
    for (i, first) in kept {
        let root = first.map(|n| components.find(n));
        let part = *part_of.entry(root).or_insert_with(|| {
            parts.push(Vec::new());
            parts.len() - 1
        });
        parts[part].push(i);
    }
    let mut result = GraphCheck {
        verdict: Verdict::Linearizable,
        parts: parts.len(),
        largest_part: parts.iter().map(Vec::len).max().unwrap_or(0),
        steps: 0,
        undecided_part: None,
    };
    for part in &parts {
        let ops: Vec<&Operation<GraphInput, GraphOutput>> = part.iter().map(|&i| &history[i]).collect();
        let model = IdentityModel::new(ops.iter().copied());
        let (verdict, steps) = search(&model, &ops, max_steps.saturating_sub(result.steps));
        result.steps += steps;
        match verdict {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable { longest_prefix, unplaceable } => {
                result.verdict = Verdict::NotLinearizable {
                    longest_prefix: longest_prefix.into_iter().map(|i| part[i]).collect(),
                    unplaceable: part[unplaceable],
                };
                result.undecided_part = None;
                return result;
            }
            Verdict::Unknown => {
                result.verdict = Verdict::Unknown;
                result.undecided_part = Some(part.len());
                return result;
            }
        }
    }
    result
}

/// Union-find over identifier numbers.
struct Components {
    parent: Vec<usize>,
}

impl Components {
    fn new(len: usize) -> Self {
        Components { parent: (0..len).collect() }
    }

    fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        self.parent[a.max(b)] = a.min(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- a register of one integer ----

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum RegIn {
        Write(i64),
        Read,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum RegOut {
        Ok,
        Value(i64),
    }

    struct Register;

    impl Model for Register {
        type State = i64;
        type Input = RegIn;
        type Output = RegOut;

        fn init(&self) -> i64 {
            0
        }

        fn step(&self, state: &i64, input: &RegIn, output: Option<&RegOut>) -> Option<i64> {
            match (input, output) {
                (RegIn::Write(v), None | Some(RegOut::Ok)) => Some(*v),
                (RegIn::Read, None) => Some(*state),
                (RegIn::Read, Some(RegOut::Value(v))) => (v == state).then_some(*state),
                _ => None,
            }
        }

        fn inert(&self, _: &i64, input: &RegIn) -> bool {
            matches!(input, RegIn::Read)
        }
    }

    type RegOp = Operation<RegIn, RegOut>;

    /// A write of `value` called at `call`, returning at `ret` (None = outcome unknown).
    fn w(value: i64, call: u64, ret: Option<u64>) -> RegOp {
        Operation { client: 0, input: RegIn::Write(value), call, completion: ret.map(|r| (r, RegOut::Ok)) }
    }

    /// A read over `[call, ret]` that returned `value`.
    fn r(value: i64, call: u64, ret: u64) -> RegOp {
        Operation { client: 1, input: RegIn::Read, call, completion: Some((ret, RegOut::Value(value))) }
    }

    enum Expect {
        Linearizable,
        Violation,
        Exactly(Verdict),
    }

    fn assert_verdict(name: &str, verdict: &Verdict, expect: &Expect) {
        let ok = match expect {
            Expect::Linearizable => *verdict == Verdict::Linearizable,
            Expect::Violation => matches!(verdict, Verdict::NotLinearizable { .. }),
            Expect::Exactly(expected) => verdict == expected,
        };
        assert!(ok, "{name}: got {verdict:?}");
    }

    fn violation(longest_prefix: Vec<usize>, unplaceable: usize) -> Expect {
        Expect::Exactly(Verdict::NotLinearizable { longest_prefix, unplaceable })
    }

    #[test]
    fn register_histories() {
        let cases: Vec<(&str, Vec<RegOp>, Expect)> = vec![
            ("empty", vec![], Expect::Linearizable),
            ("sequential", vec![w(1, 0, Some(10)), r(1, 20, 30), w(2, 40, Some(50)), r(2, 60, 70)], Expect::Linearizable),
            ("overlapping writes, read sees the first", vec![w(1, 0, Some(100)), w(2, 10, Some(90)), r(1, 110, 120)], Expect::Linearizable),
            (
                "overlapping writes, read sees the second",
                vec![w(1, 0, Some(100)), w(2, 10, Some(90)), r(2, 110, 120)],
                Expect::Linearizable,
            ),
            ("read overlapping a write sees the old value", vec![w(1, 0, Some(50)), r(0, 10, 20)], Expect::Linearizable),
            ("read overlapping a write sees the new value", vec![w(1, 0, Some(50)), r(1, 10, 20)], Expect::Linearizable),
            ("read sees a value written after it completed", vec![r(1, 0, 10), w(1, 20, Some(30))], violation(vec![], 0)),
            ("stale read after a completed write", vec![w(1, 0, Some(10)), w(2, 20, Some(30)), r(1, 40, 50)], violation(vec![0, 1], 2)),
            ("return equal to a call overlaps it", vec![w(1, 0, Some(10)), r(0, 10, 20)], Expect::Linearizable),
            ("return strictly before a call precedes it", vec![w(1, 0, Some(10)), r(0, 11, 20)], violation(vec![0], 1)),
            ("return before its own call counts as the call time", vec![w(1, 10, Some(5)), r(0, 10, 20)], Expect::Linearizable),
            ("unknown write read later", vec![w(1, 0, Some(10)), w(2, 20, None), r(2, 100, 110)], Expect::Linearizable),
            ("unknown write never observed", vec![w(1, 0, Some(10)), w(2, 20, None), r(1, 100, 110), r(1, 120, 130)], Expect::Linearizable),
            ("unknown write not visible before its call", vec![r(2, 0, 10), w(2, 20, None)], Expect::Violation),
            (
                "unknown write observed, then the older value again",
                vec![w(1, 0, Some(10)), w(2, 20, None), r(2, 30, 40), r(1, 50, 60)],
                violation(vec![0, 1, 2], 3),
            ),
            (
                "read answered like a write",
                vec![Operation { client: 0, input: RegIn::Read, call: 0, completion: Some((10, RegOut::Ok)) }],
                violation(vec![], 0),
            ),
        ];
        for (name, history, expect) in &cases {
            assert_verdict(name, &check(&Register, history, 100_000), expect);
        }
    }

    #[test]
    fn budget() {
        // Sequential, so each step linearizes one op: exactly three steps are needed.
        let history = vec![w(1, 0, Some(10)), r(1, 20, 30), w(2, 40, Some(50))];
        assert_eq!(check(&Register, &history, 1), Verdict::Unknown);
        assert_eq!(check(&Register, &history, 2), Verdict::Unknown);
        assert_eq!(check(&Register, &history, 3), Verdict::Linearizable);
        // No completed op: nothing to search.
        assert_eq!(check(&Register, &[w(1, 0, None)], 0), Verdict::Linearizable);

        let graph = vec![link(&["a", "b"], 0, 10), read("a", 20, 30, Some(&["a", "b"]))];
        assert_eq!(check_graph(&graph, 1).verdict, Verdict::Unknown);
        assert_eq!(check_graph(&graph, 2).verdict, Verdict::Linearizable);
    }

    // ---- the identity graph ----

    type GraphOp = Operation<GraphInput, GraphOutput>;

    fn strings(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    fn link(ids: &[&str], call: u64, ret: u64) -> GraphOp {
        Operation { client: 0, input: GraphInput::Link { ids: strings(ids) }, call, completion: Some((ret, GraphOutput::Linked)) }
    }

    fn link_unknown(ids: &[&str], call: u64) -> GraphOp {
        Operation { client: 0, input: GraphInput::Link { ids: strings(ids) }, call, completion: None }
    }

    fn read(id: &str, call: u64, ret: u64, profile: Option<&[&str]>) -> GraphOp {
        let answer = GraphOutput::Profile(profile.map(|ids| strings(ids).into_iter().collect()));
        Operation { client: 1, input: GraphInput::Read { id: id.to_string() }, call, completion: Some((ret, answer)) }
    }

    #[test]
    fn graph_histories() {
        let a_b_c = ["a", "b", "c"];
        let cases: Vec<(&str, Vec<GraphOp>, Expect)> = vec![
            ("read before any link is NOT_FOUND", vec![read("a", 0, 10, None), link(&["a", "b"], 20, 30)], Expect::Linearizable),
            (
                "read before any link finds a profile",
                vec![read("a", 0, 10, Some(&["a", "b"])), link(&["a", "b"], 20, 30)],
                violation(vec![], 0),
            ),
            ("read after a link sees it", vec![link(&["a", "b"], 0, 10), read("a", 20, 30, Some(&["a", "b"]))], Expect::Linearizable),
            ("read after a link misses a member", vec![link(&["a", "b"], 0, 10), read("a", 20, 30, Some(&["a"]))], violation(vec![0], 1)),
            ("read after a link is NOT_FOUND", vec![link(&["a", "b"], 0, 10), read("b", 20, 30, None)], violation(vec![0], 1)),
            (
                "concurrent links, reads see them one at a time",
                vec![
                    link(&["a", "b"], 0, 100),
                    link(&["b", "c"], 0, 100),
                    read("a", 10, 20, Some(&["a", "b"])),
                    read("a", 30, 40, Some(&a_b_c)),
                ],
                Expect::Linearizable,
            ),
            (
                "concurrent links, the second read goes back in time",
                vec![
                    link(&["a", "b"], 0, 100),
                    link(&["b", "c"], 0, 100),
                    read("a", 10, 20, Some(&a_b_c)),
                    read("a", 30, 40, Some(&["a", "b"])),
                ],
                Expect::Violation,
            ),
            (
                "transitive component through an unknown link",
                vec![link(&["a", "b"], 0, 10), link_unknown(&["b", "c"], 20), read("a", 30, 40, Some(&a_b_c))],
                Expect::Linearizable,
            ),
            (
                "unknown link never observed",
                vec![
                    link(&["a", "b"], 0, 10),
                    link_unknown(&["b", "c"], 20),
                    read("a", 30, 40, Some(&["a", "b"])),
                    read("c", 50, 60, None),
                ],
                Expect::Linearizable,
            ),
            (
                "unknown link observed, then forgotten",
                vec![link(&["a", "b"], 0, 10), link_unknown(&["b", "c"], 20), read("c", 30, 40, Some(&a_b_c)), read("c", 50, 60, None)],
                Expect::Violation,
            ),
            (
                "read answered Linked",
                vec![Operation {
                    client: 1,
                    input: GraphInput::Read { id: "a".into() },
                    call: 0,
                    completion: Some((10, GraphOutput::Linked)),
                }],
                violation(vec![], 0),
            ),
            (
                "link answered with a profile",
                vec![Operation {
                    client: 0,
                    input: GraphInput::Link { ids: strings(&["a"]) },
                    call: 0,
                    completion: Some((10, GraphOutput::Profile(None))),
                }],
                violation(vec![], 0),
            ),
            (
                "read returns an identifier of another group",
                vec![link(&["a", "b"], 0, 10), read("a", 20, 30, Some(&["a", "b", "x"]))],
                Expect::Violation,
            ),
            (
                "read of an identifier no link names finds a profile",
                vec![link(&["a", "b"], 0, 10), read("x", 20, 30, Some(&["x"]))],
                Expect::Violation,
            ),
            (
                "duplicate and single-identifier links",
                vec![link(&["a", "b"], 0, 10), link(&["b", "a", "a"], 20, 30), link(&["c"], 40, 50), read("c", 60, 70, Some(&["c"]))],
                Expect::Linearizable,
            ),
            (
                "unanswered reads are dropped, indices still refer to the history",
                vec![
                    Operation { client: 2, input: GraphInput::Read { id: "a".into() }, call: 0, completion: None },
                    link(&["a", "b"], 0, 10),
                    read("a", 20, 30, Some(&["a"])),
                ],
                violation(vec![1], 2),
            ),
        ];
        for (name, history, expect) in &cases {
            assert_verdict(name, &check_graph(history, 100_000).verdict, expect);
        }
    }

    // ---- generated histories ----

    const IDS: [&str; 5] = ["a", "b", "c", "d", "e"];

    #[derive(Debug, Clone)]
    enum Act {
        Link(Vec<usize>),
        Read(usize),
    }

    /// One op of a sequential execution, and how far its interval reaches before and after its linearization point.
    #[derive(Debug, Clone)]
    struct Timed {
        act: Act,
        before: u64,
        after: u64,
        unknown: bool,
    }

    fn execution() -> impl Strategy<Value = Vec<Timed>> {
        let act = prop_oneof![prop::collection::vec(0..IDS.len(), 1..=3).prop_map(Act::Link), (0..IDS.len()).prop_map(Act::Read)];
        let timed = (act, 0..=25u64, 0..=25u64, prop::bool::weighted(0.15)).prop_map(|(act, before, after, unknown)| Timed {
            act,
            before,
            after,
            unknown,
        });
        prop::collection::vec(timed, 1..=14)
    }

    /// The naive reference: merges every component touching `ids` with `ids`.
    fn merge(components: &mut Vec<BTreeSet<String>>, ids: &[String]) {
        let touched: BTreeSet<String> = ids.iter().cloned().collect();
        let (touching, mut rest): (Vec<_>, Vec<_>) = std::mem::take(components).into_iter().partition(|c| !c.is_disjoint(&touched));
        rest.push(touching.into_iter().flatten().chain(touched).collect());
        *components = rest;
    }

    /// Runs the execution sequentially, with op `i` taking effect at `100 + 10 i`, and records it with intervals around
    /// those points, so that the true order is a valid linearization.
    fn record(execution: &[Timed]) -> Vec<GraphOp> {
        let mut components = Vec::new();
        let mut point = 100;
        execution
            .iter()
            .enumerate()
            .map(|(client, timed)| {
                point += 10;
                let (input, output) = match &timed.act {
                    Act::Link(ids) => {
                        let ids: Vec<String> = ids.iter().map(|&i| IDS[i].to_string()).collect();
                        merge(&mut components, &ids);
                        (GraphInput::Link { ids }, GraphOutput::Linked)
                    }
                    Act::Read(i) => {
                        let profile = components.iter().find(|c| c.contains(IDS[*i])).cloned();
                        (GraphInput::Read { id: IDS[*i].to_string() }, GraphOutput::Profile(profile))
                    }
                };
                let completion = (!timed.unknown).then_some((point + timed.after, output));
                Operation { client, input, call: point - timed.before, completion }
            })
            .collect()
    }

    /// An answer the read at `index` can never give: its answer plus an identifier never connected to its identifier.
    fn impossible_answer(history: &[GraphOp], index: usize) -> Option<GraphOutput> {
        let (GraphInput::Read { id }, Some((_, GraphOutput::Profile(answer)))) = (&history[index].input, &history[index].completion) else {
            return None;
        };
        let mut all = Vec::new();
        for op in history {
            if let GraphInput::Link { ids } = &op.input {
                merge(&mut all, ids);
            }
        }
        let reachable = all.into_iter().find(|c| c.contains(id)).unwrap_or_else(|| BTreeSet::from([id.clone()]));
        let stranger = IDS.iter().find(|x| !reachable.contains(**x)).map_or("zz".to_string(), |x| x.to_string());
        let mut impossible = answer.clone().unwrap_or_else(|| BTreeSet::from([id.clone()]));
        impossible.insert(stranger);
        Some(GraphOutput::Profile(Some(impossible)))
    }

    /// The identity model with its pruning turned off: the plain search of Wing, Gong and Lowe.
    struct Unpruned(IdentityModel);

    impl Model for Unpruned {
        type State = Partition;
        type Input = GraphInput;
        type Output = GraphOutput;

        fn init(&self) -> Partition {
            self.0.init()
        }

        fn step(&self, state: &Partition, input: &GraphInput, output: Option<&GraphOutput>) -> Option<Partition> {
            self.0.step(state, input, output)
        }
    }

    /// The plain search over the whole history, unsplit and unpruned, as the reference for [`check_graph`].
    fn reference(history: &[GraphOp]) -> Verdict {
        let answered: Vec<GraphOp> =
            history.iter().filter(|op| !matches!((&op.input, &op.completion), (GraphInput::Read { .. }, None))).cloned().collect();
        check(&Unpruned(IdentityModel::new(&answered)), &answered, u64::MAX)
    }

    /// A read's answer replaced by any set of identifiers (or NOT_FOUND), right or wrong.
    fn any_answer(history: &mut [GraphOp], index: usize, members: &[usize]) {
        if let (GraphInput::Read { .. }, Some((_, GraphOutput::Profile(answer)))) = (&history[index].input, &mut history[index].completion)
        {
            *answer = (!members.is_empty()).then(|| members.iter().map(|&m| IDS[m % IDS.len()].to_string()).collect());
        }
    }

    #[test]
    fn components_are_checked_apart_and_indices_refer_to_the_history() {
        let history =
            vec![link(&["a", "b"], 0, 10), link(&["x", "y"], 0, 10), read("a", 20, 30, Some(&["a", "b"])), read("y", 20, 30, Some(&["y"]))];
        let checked = check_graph(&history, 1_000);
        assert_eq!(checked.parts, 2);
        assert_eq!(checked.largest_part, 2);
        assert_eq!(checked.verdict, Verdict::NotLinearizable { longest_prefix: vec![1], unplaceable: 3 });
        // A read of an identifier of the other component is caught too.
        let leak = vec![link(&["a", "b"], 0, 10), link(&["x", "y"], 0, 10), read("a", 20, 30, Some(&["a", "b", "x"]))];
        assert!(matches!(check_graph(&leak, 1_000).verdict, Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn redundant_unknown_links_and_reads_cost_no_search() {
        // One client links a and b once, then four hundred unacknowledged links repeat it while reads look on: the old
        // search kept every unknown link as a candidate until the end. Each one is inert as soon as it is called,
        // so the search places every operation once, and a wrong read among them is still found.
        let mut history = vec![link(&["a", "b"], 0, 10)];
        for i in 0..400u64 {
            let t = 20 + 10 * i;
            history.push(link_unknown(&["b", "a"], t));
            history.push(read("a", t + 1, t + 5, Some(&["a", "b"])));
        }
        let checked = check_graph(&history, 10_000);
        assert_eq!(checked.verdict, Verdict::Linearizable);
        assert!(checked.steps <= 2 * history.len() as u64, "{} steps for {} operations", checked.steps, history.len());
        let last = history.len() - 1;
        history[last] = read("a", 10_000, 10_010, Some(&["a"]));
        assert!(matches!(check_graph(&history, 10_000).verdict, Verdict::NotLinearizable { unplaceable, .. } if unplaceable == last));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn recorded_executions_are_linearizable(execution in execution()) {
            let history = record(&execution);
            prop_assert_eq!(check_graph(&history, 1_000_000).verdict, Verdict::Linearizable, "{:?}", history);
        }

        #[test]
        fn an_impossible_answer_is_caught(execution in execution(), pick in any::<prop::sample::Index>()) {
            let mut history = record(&execution);
            let reads: Vec<usize> = (0..history.len()).filter(|&i| impossible_answer(&history, i).is_some()).collect();
            prop_assume!(!reads.is_empty());
            let index = reads[pick.index(reads.len())];
            if let (Some(answer), Some((_, output))) = (impossible_answer(&history, index), history[index].completion.as_mut()) {
                *output = answer;
            }
            let verdict = check_graph(&history, 1_000_000).verdict;
            prop_assert!(matches!(verdict, Verdict::NotLinearizable { .. }), "{:?} for {:?}", verdict, history);
        }

        #[test]
        fn pruning_and_splitting_keep_the_verdict(
            execution in execution(),
            pick in any::<prop::sample::Index>(),
            members in prop::collection::vec(0..IDS.len(), 0..=3),
            perturb in prop::bool::weighted(0.5),
        ) {
            let mut history = record(&execution);
            let reads: Vec<usize> = (0..history.len()).filter(|&i| matches!(history[i].input, GraphInput::Read { .. })).collect();
            if perturb && !reads.is_empty() {
                any_answer(&mut history, reads[pick.index(reads.len())], &members);
            }
            let expected = reference(&history).is_linearizable();
            let checked = check_graph(&history, u64::MAX);
            prop_assert_eq!(checked.verdict.is_linearizable(), expected, "{:?} for {:?}", checked.verdict, history);
        }
    }
}
