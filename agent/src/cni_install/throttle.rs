//! Spacing out restorations of the conflist entry when something keeps taking it away: a few
//! are free, then each waits twice as long as the one before, up to a cap.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

#[derive(Debug, Clone)]
pub struct Throttle {
    window: Duration,
    free: usize,
    first: Duration,
    max: Duration,
    history: VecDeque<Instant>,
}

impl Default for Throttle {
    /// Five restorations a minute go through at once; then 1 s, 2 s, 4 s ... up to 30 s apart.
    fn default() -> Self {
        Throttle::new(
            Duration::from_secs(60),
            5,
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
    }
}

impl Throttle {
    pub fn new(window: Duration, free: usize, first: Duration, max: Duration) -> Self {
        Throttle {
            window,
            free,
            first,
            max,
            history: VecDeque::new(),
        }
    }

    fn prune(&mut self, now: Instant) {
        while self
            .history
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > self.window)
        {
            self.history.pop_front();
        }
    }

    /// How long to wait before the next restoration; `None`: now.
    pub fn delay(&mut self, now: Instant) -> Option<Duration> {
        self.prune(now);
        let due = *self.history.back()? + self.gap()?;
        due.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// The spacing the next restoration gets after the last one; `None` while they are free.
    pub fn gap(&self) -> Option<Duration> {
        let extra = self.history.len().checked_sub(self.free)?;
        Some(
            self.first
                .saturating_mul(2u32.saturating_pow(extra.min(16) as u32))
                .min(self.max),
        )
    }

    pub fn record(&mut self, now: Instant) {
        self.prune(now);
        self.history.push_back(now);
    }

    /// Restorations within the window.
    pub fn recent(&self) -> usize {
        self.history.len()
    }

    pub fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_restorations_then_doubling_gaps_then_forgiven() {
        let s = Duration::from_secs(1);
        let mut t = Throttle::new(60 * s, 2, s, 4 * s);
        let t0 = Instant::now();
        for i in 0..2 {
            assert_eq!(t.delay(t0 + i * s), None);
            t.record(t0 + i * s);
        }
        // Third within the window: 1 s after the last one.
        assert_eq!(t.delay(t0 + s), Some(s));
        assert_eq!(t.delay(t0 + 2 * s), None);
        t.record(t0 + 2 * s);
        assert_eq!(t.delay(t0 + 2 * s), Some(2 * s));
        t.record(t0 + 4 * s);
        t.record(t0 + 8 * s);
        // Capped.
        assert_eq!(t.delay(t0 + 8 * s), Some(4 * s));
        assert_eq!(t.recent(), 5);
        // A quiet minute later everything is forgotten.
        assert_eq!(t.delay(t0 + 70 * s), None);
        assert_eq!(t.recent(), 0);
    }
}
