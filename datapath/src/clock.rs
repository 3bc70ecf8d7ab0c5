//! CLOCK_BOOTTIME, the clock of every timestamp and expiry in the maps.
//!
//! The program reads it with `bpf_ktime_get_boot_ns`, userspace with
//! `clock_gettime(CLOCK_BOOTTIME)`: the same clock on both sides, so an expiry the agent writes
//! is exactly the instant the program stops passing the pair. Unlike CLOCK_MONOTONIC it keeps
//! counting while the machine is suspended, so a suspend cannot stretch an authentication.
//! (The program caches the clock per CPU for one scheduler tick and compares expiries with
//! 10 ms of slack, see `bpf/meshauth.h`, `struct ma_clock`.)

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// An instant on CLOCK_BOOTTIME, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BootTime(pub u64);

impl BootTime {
    /// Now.
    pub fn now() -> Self {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME exists on every Linux this
        // crate runs on (2.6.39+), so the call cannot fail.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        BootTime((ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64))
    }

    /// `d` from now.
    pub fn after(d: Duration) -> Self {
        Self::now().saturating_add(d)
    }

    /// The boot-clock instant of a wall-clock instant (a certificate's `notAfter`), as seen now.
    pub fn from_system_time(t: SystemTime) -> Self {
        let now = Self::now();
        match t.duration_since(SystemTime::now()) {
            Ok(ahead) => now.saturating_add(ahead),
            Err(e) => BootTime(now.0.saturating_sub(duration_ns(e.duration()))),
        }
    }

    /// The wall-clock instant of this boot-clock instant, as seen when the clocks read
    /// `now_boot` and `now_wall` (an event's time, from the moment it is read).
    pub fn to_system_time(self, now_boot: BootTime, now_wall: SystemTime) -> SystemTime {
        if self <= now_boot {
            now_wall.checked_sub(Duration::from_nanos(now_boot.0 - self.0)).unwrap_or(now_wall)
        } else {
            now_wall.checked_add(Duration::from_nanos(self.0 - now_boot.0)).unwrap_or(now_wall)
        }
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Self {
        BootTime(self.0.saturating_add(duration_ns(d)))
    }

    /// How long until this instant; `None` once it has passed.
    pub fn remaining(self) -> Option<Duration> {
        let now = Self::now();
        (self.0 > now.0).then(|| Duration::from_nanos(self.0 - now.0))
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_moves_forward_and_converts_wall_time() {
        let a = BootTime::now();
        let b = BootTime::after(Duration::from_secs(10));
        assert!(b > a);
        let r = b.remaining().unwrap();
        assert!(r <= Duration::from_secs(10) && r > Duration::from_secs(9));
        let w = BootTime::from_system_time(SystemTime::now() + Duration::from_secs(60));
        assert!(w.remaining().unwrap() > Duration::from_secs(59));
        let past = BootTime::from_system_time(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(past.remaining(), None);
        let (boot, wall) = (BootTime(5_000_000_000), SystemTime::UNIX_EPOCH + Duration::from_secs(100));
        assert_eq!(BootTime(3_000_000_000).to_system_time(boot, wall), wall - Duration::from_secs(2));
        assert_eq!(BootTime(6_000_000_000).to_system_time(boot, wall), wall + Duration::from_secs(1));
    }
}
