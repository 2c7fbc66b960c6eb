//! How far a download has come and how fast it goes: shared between the transfer that moves the
//! bytes and every model waiting on the same file, read by the supervisor into its report.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metalkube_api::DownloadProgress;

/// The rate is measured over this much recent time, so a stall shows within seconds and a
/// resumed transfer is not credited with the bytes it found on disk.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Samples closer together than this are merged: a fast link delivers tens of thousands of
/// chunks a second, and the rate needs a point every so often, not one per chunk.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Byte counts of one fetch (every file of a model), updated by the transfer.
#[derive(Debug, Default)]
pub struct ProgressCell {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Bytes of every file present: complete ones, partial ones found on disk, and received.
    done: u64,
    total: Option<u64>,
    /// (when, bytes received since the fetch began), oldest first, within `RATE_WINDOW`.
    samples: VecDeque<(Instant, u64)>,
    received: u64,
}

impl ProgressCell {
    pub fn set_total(&self, total: Option<u64>, already_done: u64) {
        let mut c = self.lock();
        c.total = total;
        c.done = already_done;
    }

    /// Bytes that arrived over the network.
    pub fn received(&self, bytes: u64, now: Instant) {
        let mut c = self.lock();
        c.done += bytes;
        c.received += bytes;
        let received = c.received;
        match c.samples.back_mut() {
            Some(last) if now.saturating_duration_since(last.0) < SAMPLE_EVERY => last.1 = received,
            _ => c.samples.push_back((now, received)),
        }
        while c.samples.len() > 2 && c.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
            c.samples.pop_front();
        }
    }

    /// A partial file was thrown away (the server's copy changed): its bytes are not done.
    pub fn discarded(&self, bytes: u64) {
        let mut c = self.lock();
        c.done = c.done.saturating_sub(bytes);
    }

    pub fn snapshot(&self, now: Instant) -> DownloadProgress {
        let c = self.lock();
        let rate = rate(&c.samples, now);
        DownloadProgress::new(c.done, c.total, rate)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Counts stay consistent field by field; a panic elsewhere must not stop progress reports.
        metalkube_runtime::sync::lock(&self.inner)
    }
}

/// Bytes per second over the samples in the window, up to `now` (a stalled transfer's rate
/// falls as time passes without bytes).
fn rate(samples: &VecDeque<(Instant, u64)>, now: Instant) -> Option<f64> {
    let recent: Vec<&(Instant, u64)> = samples.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).collect();
    let (first, last) = (recent.first()?, recent.last()?);
    let span = now.duration_since(first.0).as_secs_f64();
    if span < 0.2 {
        return None;
    }
    Some(last.1.saturating_sub(first.1) as f64 / span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_follow_recent_bytes_only() {
        let cell = ProgressCell::default();
        let t0 = Instant::now();
        cell.set_total(Some(10_000), 4_000); // 4,000 bytes resumed from disk
        for i in 1..=10 {
            cell.received(100, t0 + Duration::from_millis(100 * i));
        }
        let p = cell.snapshot(t0 + Duration::from_secs(1));
        assert_eq!((p.done_bytes, p.total_bytes), (5_000, Some(10_000)));
        let rate = p.bytes_per_second.unwrap();
        assert!((900.0..=1_100.0).contains(&rate), "about 1,000 B/s, not counting resumed bytes: {rate}");
        let eta = p.eta_seconds.unwrap();
        assert!((4.5..=5.6).contains(&eta), "{eta}");

        // Nothing for a whole window: the rate is gone, and so is the ETA.
        let stalled = cell.snapshot(t0 + Duration::from_secs(30));
        assert_eq!((stalled.bytes_per_second, stalled.eta_seconds), (None, None));
    }

    #[test]
    fn chunks_close_together_make_one_sample() {
        let cell = ProgressCell::default();
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            cell.received(16, t0 + Duration::from_micros(100 * i)); // 10,000 chunks in one second
        }
        let samples = cell.lock().samples.len();
        assert!((10..=11).contains(&samples), "one sample per 100 ms, not per chunk: {samples}");
        let rate = cell.snapshot(t0 + Duration::from_secs(1)).bytes_per_second.unwrap();
        assert!((140_000.0..=170_000.0).contains(&rate), "{rate}");
    }

    #[test]
    fn discarded_partials_are_taken_back() {
        let cell = ProgressCell::default();
        cell.set_total(None, 300);
        cell.discarded(500);
        let p = cell.snapshot(Instant::now());
        assert_eq!((p.done_bytes, p.total_bytes, p.eta_seconds), (0, None, None));
    }
}
