//! Eventual assertions: poll a condition every few milliseconds until it holds or a
//! timeout passes, instead of sleeping a fixed time and hoping.
//!
//! ```
//! use std::time::Duration;
//! use bulkhead_testkit::assert_eventually;
//!
//! let start = std::time::Instant::now();
//! assert_eventually!(Duration::from_secs(5), || start.elapsed() > Duration::from_millis(20), "clock stuck");
//! ```
//!
//! For tokio tests use [`assert_eventually_async!`](crate::assert_eventually_async) (or
//! [`eventually_async`]), which sleeps with `tokio::time` so it never blocks the runtime
//! and follows a paused test clock (`tokio::time::pause`).

use std::fmt;
use std::time::{Duration, Instant};

/// First pause between polls; it doubles up to [`MAX_POLL_INTERVAL`].
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Longest pause between polls.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A condition did not hold within its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    /// How long we polled.
    pub waited: Duration,
    /// How many times the condition was evaluated.
    pub attempts: u64,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "still false after waiting {:?} ({} checks)", self.waited, self.attempts)
    }
}

impl std::error::Error for TimedOut {}

/// Polls `f` until it returns `Some`, for at most `timeout`; returns the value.
///
/// `f` always runs at least once, and once more at the deadline.
pub fn eventually_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T, TimedOut> {
    let start = Instant::now();
    let mut attempts = 0;
    let mut interval = MIN_POLL_INTERVAL;
    loop {
        attempts += 1;
        if let Some(v) = f() {
            return Ok(v);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(TimedOut { waited, attempts });
        }
        std::thread::sleep(interval.min(timeout - waited));
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// Polls `f` until it returns `true`, for at most `timeout`.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<(), TimedOut> {
    eventually_some(timeout, || f().then_some(()))
}

/// Async [`eventually_some`]: sleeps with `tokio::time::sleep` between polls.
pub async fn eventually_some_async<T>(timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T, TimedOut> {
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    let mut interval = MIN_POLL_INTERVAL;
    loop {
        attempts += 1;
        if let Some(v) = f().await {
            return Ok(v);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(TimedOut { waited, attempts });
        }
        tokio::time::sleep(interval.min(timeout - waited)).await;
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// Async [`eventually`]: polls `f().await` until it is `true`, for at most `timeout`.
///
/// Takes an async closure (`async || …`) or a closure returning a future
/// (`|| async { … }`).
pub async fn eventually_async(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> Result<(), TimedOut> {
    eventually_some_async(timeout, async || f().await.then_some(())).await
}

/// Panics unless `condition` (a closure returning `bool`) becomes true within `timeout`
/// (a [`Duration`](std::time::Duration)), polling every few milliseconds. The panic
/// message says how long it waited.
///
/// ```
/// # use std::time::Duration;
/// # use bulkhead_testkit::assert_eventually;
/// let n = std::cell::Cell::new(0);
/// assert_eventually!(Duration::from_secs(1), || { n.set(n.get() + 1); n.get() >= 3 });
/// assert_eventually!(Duration::from_secs(1), || n.get() >= 3, "counter at {}", n.get());
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $condition:expr $(,)?) => {
        $crate::assert_eventually!($timeout, $condition, "{}", stringify!($condition))
    };
    ($timeout:expr, $condition:expr, $($message:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if let ::std::result::Result::Err(timed_out) = $crate::eventually::eventually(timeout, $condition) {
            ::std::panic!(
                "assert_eventually failed: {} — {} (timeout {:?})",
                ::std::format_args!($($message)+),
                timed_out,
                timeout,
            );
        }
    }};
}

/// Async [`assert_eventually!`] for tokio tests: `condition` is an async closure
/// (`async || …`) or a closure returning a future (`|| async { … }`) resolving to
/// `bool`. Must be used inside an `async` context; sleeps with `tokio::time`.
///
/// ```
/// # use std::time::Duration;
/// # use bulkhead_testkit::assert_eventually_async;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (tx, rx) = tokio::sync::watch::channel(0);
/// tokio::spawn(async move { tx.send(7).ok(); std::future::pending::<()>().await });
/// assert_eventually_async!(Duration::from_secs(5), async || *rx.borrow() == 7, "value is {}", *rx.borrow());
/// # }
/// ```
#[macro_export]
macro_rules! assert_eventually_async {
    ($timeout:expr, $condition:expr $(,)?) => {
        $crate::assert_eventually_async!($timeout, $condition, "{}", stringify!($condition))
    };
    ($timeout:expr, $condition:expr, $($message:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if let ::std::result::Result::Err(timed_out) = $crate::eventually::eventually_async(timeout, $condition).await {
            ::std::panic!(
                "assert_eventually_async failed: {} — {} (timeout {:?})",
                ::std::format_args!($($message)+),
                timed_out,
                timeout,
            );
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn returns_as_soon_as_true() {
        let calls = Cell::new(0);
        let start = Instant::now();
        assert_eventually!(Duration::from_secs(10), || {
            calls.set(calls.get() + 1);
            calls.get() == 3
        });
        assert_eq!(calls.get(), 3);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn times_out_with_the_message_and_waited_time() {
        let err = std::panic::catch_unwind(|| {
            assert_eventually!(Duration::from_millis(50), || false, "flow {} never showed up", 42);
        })
        .expect_err("must panic");
        let msg = err.downcast_ref::<String>().expect("formatted panic message");
        assert!(msg.contains("flow 42 never showed up"), "{msg}");
        assert!(msg.contains("still false after waiting"), "{msg}");
        assert!(msg.contains("timeout 50ms"), "{msg}");
    }

    #[test]
    fn default_message_is_the_condition() {
        let err = std::panic::catch_unwind(|| assert_eventually!(Duration::ZERO, || 1 + 1 == 3)).expect_err("panics");
        let msg = err.downcast_ref::<String>().expect("formatted panic message");
        assert!(msg.contains("1 + 1 == 3"), "{msg}");
    }

    #[test]
    fn waits_at_least_the_timeout() {
        let start = Instant::now();
        let res = eventually(Duration::from_millis(30), || false);
        let err = res.expect_err("never true");
        assert!(start.elapsed() >= Duration::from_millis(30));
        assert!(err.waited >= Duration::from_millis(30));
        assert!(err.attempts >= 2);
    }

    #[test]
    fn eventually_some_returns_the_value() {
        let n = Cell::new(0);
        let v = eventually_some(Duration::from_secs(1), || {
            n.set(n.get() + 1);
            (n.get() == 2).then_some("ready")
        });
        assert_eq!(v, Ok("ready"));
    }

    #[tokio::test]
    async fn async_variant_sees_other_tasks() {
        let counter = Arc::new(AtomicU32::new(0));
        let c = counter.clone();
        let task = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        assert_eventually_async!(Duration::from_secs(5), async || counter.load(Ordering::SeqCst) == 5);
        assert_eventually_async!(Duration::from_secs(5), || async { counter.load(Ordering::SeqCst) == 5 }, "counter");
        task.await.expect("task");
    }
}
