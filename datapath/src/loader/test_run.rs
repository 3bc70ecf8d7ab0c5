//! Running the loaded programs on a packet outside real traffic (`BPF_PROG_TEST_RUN`), and the kernel's
//! statistics of them: what the tests and `meshauthctl bench datapath` measure.

use aya::programs::SchedClassifier;

use super::{Datapath, DatapathError, FROM_POD, TAG_SYN, TO_POD, prog_err};

/// The two programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Egress of the host-side veth: traffic into the pod.
    ToPod,
    /// Ingress of the host-side veth: traffic from the pod.
    FromPod,
    /// Egress of an uplink: the connection tagger.
    TagSyn,
}

/// What one `BPF_PROG_TEST_RUN` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value: `TC_ACT_UNSPEC` (-1) passes, `TC_ACT_SHOT` (2) drops.
    pub retval: i32,
    /// Kernel-measured time per run, averaged over the repeats (whole nanoseconds).
    pub ns_per_run: u64,
}

impl TestRunOutcome {
    /// Whether the program let the packet through.
    pub fn passed(&self) -> bool {
        self.retval != 2
    }
}

pub(crate) fn test_run(prog: &SchedClassifier, name: &'static str, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let r = prog.test_run(TestRunOptions { data_in: Some(packet), repeat, ..TestRunOptions::default() }).map_err(prog_err(name))?;
    Ok(TestRunOutcome { retval: r.return_value as i32, ns_per_run: u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX) })
}

impl Datapath {
    /// Runs a program on `packet` `repeat` times with `BPF_PROG_TEST_RUN`, against the live
    /// maps (the run counts and may write conntrack like real traffic).
    pub fn test_run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
        let (name, prog) = match hook {
            Hook::ToPod => (TO_POD, &self.to_pod),
            Hook::FromPod => (FROM_POD, &self.from_pod),
            Hook::TagSyn => (TAG_SYN, &self.tag_syn),
        };
        test_run(prog, name, packet, repeat)
    }

    /// The kernel's record of one of the programs: its run count and run time, which the
    /// kernel keeps while BPF statistics are on (`aya::sys::enable_stats`).
    pub fn program_info(&self, hook: Hook) -> Result<aya::programs::ProgramInfo, DatapathError> {
        let (name, prog) = match hook {
            Hook::ToPod => (TO_POD, &self.to_pod),
            Hook::FromPod => (FROM_POD, &self.from_pod),
            Hook::TagSyn => (TAG_SYN, &self.tag_syn),
        };
        prog.info().map_err(prog_err(name))
    }
}
