//! Kernel maps are read at every scrape or refresh; a read can fail (the
//! kernel refused the syscall, memory pressure). Exporting 0 then would be
//! a counter reset to Prometheus and a false "no losses" on screen: keep
//! the last value read and count the failure instead.

/// The last good value of one map read, and how many reads failed.
#[derive(Clone, Debug, Default)]
pub struct LastGood<T> {
    value: T,
    failures: u64,
}

impl<T: Clone> LastGood<T> {
    pub fn new(value: T) -> Self {
        Self { value, failures: 0 }
    }

    /// Takes a fresh read: its value when it worked, else the last good
    /// one (the failure is counted).
    pub fn update<E>(&mut self, read: Result<T, E>) -> T {
        match read {
            Ok(value) => self.value = value,
            Err(_) => self.failures += 1,
        }
        self.value.clone()
    }

    pub fn value(&self) -> &T {
        &self.value
    }

    /// Reads that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_read_keeps_the_last_good_value_and_is_counted() {
        let mut lost = LastGood::new(0u64);
        assert_eq!(lost.update::<()>(Ok(7)), 7);
        assert_eq!(lost.update(Err("EPERM")), 7, "a failed read is not a reset to 0");
        assert_eq!(lost.update(Err("EPERM")), 7);
        assert_eq!(lost.failures(), 2);
        assert_eq!(lost.update::<()>(Ok(9)), 9);
        assert_eq!((*lost.value(), lost.failures()), (9, 2));
    }

    #[test]
    fn a_failure_before_any_good_read_gives_the_initial_value() {
        let mut histograms: LastGood<Option<u32>> = LastGood::default();
        assert_eq!(histograms.update(Err(())), None);
        assert_eq!(histograms.failures(), 1);
    }
}
