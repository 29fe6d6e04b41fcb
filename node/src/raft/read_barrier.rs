//! One leadership confirmation shared by every linearizable read waiting
//! for one.
//!
//! A linearizable read on a leader must see every write committed before
//! the read arrived. openraft's `ensure_linearizable` gives that: it
//! confirms leadership with a round of heartbeats to a quorum, then waits
//! until the log up to the commit point it saw is applied. It costs a round
//! trip to the followers, one per call. Reads that arrive while a round is
//! under way cannot use that round (it may have started before them), but
//! they can all share the next one: a round that starts after a read
//! arrived confirms it, whoever asked for it. So at most two rounds are
//! ever wanted at once, whatever the number of reads: the one running and
//! the next.
//!
//! Rounds are numbered. A read arriving when no round runs starts round
//! `n`; one arriving while round `n` runs asks for round `n + 1`, which the
//! driver starts when round `n` ends. A read returns the outcome of the
//! first round numbered at least what it asked for.

use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Shares leadership confirmations among reads. Cheap to clone.
pub struct ReadBarrier<E: Clone + Send + Sync + 'static> {
    inner: Arc<Inner<E>>,
}

impl<E: Clone + Send + Sync + 'static> Clone for ReadBarrier<E> {
    fn clone(&self) -> Self {
        ReadBarrier { inner: self.inner.clone() }
    }
}

struct Inner<E> {
    rounds: Mutex<Rounds>,
    /// The last round finished and its outcome.
    done: watch::Sender<(u64, Result<(), E>)>,
}

struct Rounds {
    /// The number of the next round to start.
    next: u64,
    running: bool,
    /// The highest round a read waits for.
    wanted: u64,
}

impl<E: Clone + Send + Sync + 'static> Default for ReadBarrier<E> {
    fn default() -> Self {
        let (done, _) = watch::channel((0, Ok(())));
        ReadBarrier { inner: Arc::new(Inner { rounds: Mutex::new(Rounds { next: 1, running: false, wanted: 0 }), done }) }
    }
}

impl<E: Clone + Send + Sync + 'static> ReadBarrier<E> {
    /// Waits for a round of `confirm` that started after this call, and
    /// returns its outcome. `confirm` runs in a task of its own, so a
    /// caller that goes away does not stall the others.
    pub async fn confirm<F, Fut>(&self, confirm: F) -> Result<(), E>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let mut done = self.inner.done.subscribe();
        let target = {
            let mut r = self.inner.rounds.lock().unwrap_or_else(|p| p.into_inner());
            let target = r.next;
            r.wanted = r.wanted.max(target);
            if !r.running {
                r.running = true;
                let inner = self.inner.clone();
                tokio::spawn(drive(inner, confirm));
            }
            target
        };
        loop {
            {
                let (round, outcome) = &*done.borrow_and_update();
                if *round >= target {
                    return outcome.clone();
                }
            }
            if done.changed().await.is_err() {
                unreachable!("the barrier holds its sender");
            }
        }
    }
}

/// Runs rounds while reads want them.
async fn drive<E, F, Fut>(inner: Arc<Inner<E>>, confirm: F)
where
    E: Clone + Send + Sync + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
{
    loop {
        let round = {
            let mut r = inner.rounds.lock().unwrap_or_else(|p| p.into_inner());
            let round = r.next;
            r.next += 1;
            round
        };
        let outcome = confirm().await;
        let _previous = inner.done.send_replace((round, outcome));
        let mut r = inner.rounds.lock().unwrap_or_else(|p| p.into_inner());
        if r.wanted < r.next {
            r.running = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Many reads arriving together share rounds (at most the one running
    /// and the next), and each read's round started after the read arrived.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_share_rounds_that_started_after_them() {
        let barrier: ReadBarrier<String> = ReadBarrier::default();
        let started = Arc::new(AtomicU64::new(0));
        let clock = Arc::new(AtomicU64::new(0));
        let round = {
            let (started, clock) = (started.clone(), clock.clone());
            move || {
                let (started, clock) = (started.clone(), clock.clone());
                async move {
                    let at = clock.fetch_add(1, Ordering::SeqCst);
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err::<(), String>(format!("{at}"))
                }
            }
        };
        let mut reads = Vec::new();
        for _ in 0..50 {
            let (barrier, round, clock) = (barrier.clone(), round.clone(), clock.clone());
            reads.push(tokio::spawn(async move {
                let arrived = clock.fetch_add(1, Ordering::SeqCst);
                let began: u64 = barrier.confirm(round).await.unwrap_err().parse().unwrap();
                assert!(began > arrived, "a read was confirmed by a round that started before it ({began} <= {arrived})");
            }));
            if reads.len() % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for r in reads {
            r.await.unwrap();
        }
        let rounds = started.load(Ordering::SeqCst);
        assert!((1..=20).contains(&rounds), "{rounds} rounds for 50 reads");
        // Idle again: a later read starts a round of its own.
        barrier.confirm(round).await.unwrap_err();
        assert_eq!(started.load(Ordering::SeqCst), rounds + 1);
    }
}
