//! Durations and counters the daemon keeps for the control socket's `stats` request and the
//! benchmark.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// Samples kept per series: enough for stable percentiles, bounded for a daemon that runs for
/// months.
const MAX_SAMPLES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    /// Building a clean snapshot: boot, wait for `ready`, save.
    Build,
    /// From the end of a job to the slot being ready again.
    Revert,
    /// From a job's arrival to the guest's `started`.
    Assign,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    build_ms: VecDeque<u64>,
    revert_ms: VecDeque<u64>,
    assign_ms: VecDeque<u64>,
    jobs_ok: u64,
    jobs_failed: u64,
}

/// What the `stats` request returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub build_ms: Vec<u64>,
    pub revert_ms: Vec<u64>,
    pub assign_ms: Vec<u64>,
    /// Jobs whose guest reported `finished`, whatever their exit code.
    pub jobs_ok: u64,
    /// Jobs that ended any other way: timeout, guest failure, protocol error, cancellation.
    pub jobs_failed: u64,
}

impl Metrics {
    pub fn record(&self, series: Series, duration: Duration) {
        let mut inner = self.inner.lock().expect("metrics lock");
        let samples = match series {
            Series::Build => &mut inner.build_ms,
            Series::Revert => &mut inner.revert_ms,
            Series::Assign => &mut inner.assign_ms,
        };
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(duration.as_millis() as u64);
    }

    pub fn count_job(&self, ok: bool) {
        let mut inner = self.inner.lock().expect("metrics lock");
        if ok {
            inner.jobs_ok += 1;
        } else {
            inner.jobs_failed += 1;
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().expect("metrics lock");
        Snapshot {
            build_ms: inner.build_ms.iter().copied().collect(),
            revert_ms: inner.revert_ms.iter().copied().collect(),
            assign_ms: inner.assign_ms.iter().copied().collect(),
            jobs_ok: inner.jobs_ok,
            jobs_failed: inner.jobs_failed,
        }
    }
}

/// The `p`th percentile (0 to 100) of `samples` by the nearest-rank method, or 0 for none.
pub fn percentile(samples: &[u64], p: u32) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&samples, 50), 10);
        assert_eq!(percentile(&samples, 95), 19);
        assert_eq!(percentile(&samples, 100), 20);
        assert_eq!(percentile(&[7], 50), 7);
        assert_eq!(percentile(&[], 50), 0);
    }

    #[test]
    fn series_keep_only_the_newest_samples() {
        let metrics = Metrics::default();
        for ms in 0..(MAX_SAMPLES as u64 + 10) {
            metrics.record(Series::Revert, Duration::from_millis(ms));
        }
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.revert_ms.len(), MAX_SAMPLES);
        assert_eq!(snapshot.revert_ms[0], 10);
    }
}
