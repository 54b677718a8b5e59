//! What netlens can show, and which hooks serve each part. A kernel that
//! lacks a hook loses only the features that need it: every feature lists
//! its ways to be served, best first, and the loader takes the first way
//! whose hooks all load and attach (see `loader::Probes::attach_all`).
//! Only the connection lifecycle, retransmissions and resets are required.

/// One way to serve a feature: these programs (names in the eBPF object and
/// in `loader::HOOKS`), all attached; `degraded` says what is lost when this
/// is not the best way.
#[derive(Debug)]
pub struct Way {
    pub programs: &'static [&'static str],
    pub degraded: Option<&'static str>,
}

#[derive(Debug)]
pub struct Feature {
    /// Its name in `check`, stderr and `netlens_feature_enabled{feature}`.
    pub name: &'static str,
    /// What a user sees of it.
    pub shows: &'static str,
    /// Without it netlens refuses to start.
    pub required: bool,
    pub ways: &'static [Way],
}

const fn full(programs: &'static [&'static str]) -> Way {
    Way { programs, degraded: None }
}

const fn degraded(programs: &'static [&'static str], why: &'static str) -> Way {
    Way { programs, degraded: Some(why) }
}

pub const FEATURES: &[Feature] = &[
    Feature {
        name: "lifecycle",
        shows: "handshakes, failed connects, closes",
        required: true,
        ways: &[full(&["inet_sock_set_state"])],
    },
    Feature { name: "retransmits", shows: "retransmitted segments", required: true, ways: &[full(&["tcp_retransmit_skb"])] },
    Feature {
        name: "resets",
        shows: "resets sent and received",
        required: true,
        ways: &[full(&["tcp_send_reset", "tcp_receive_reset"])],
    },
    Feature {
        name: "synack_retransmits",
        shows: "listeners' SYN-ACK retransmissions, passive handshakes that needed them",
        required: false,
        ways: &[full(&["tcp_retransmit_synack"])],
    },
    Feature {
        name: "transport",
        shows: "cwnd, RTTs, slow-start exit, zero windows",
        required: false,
        ways: &[full(&["tcp_probe"])],
    },
    Feature {
        name: "hol_stalls",
        shows: "head-of-line stalls",
        required: false,
        ways: &[
            full(&["tcp_probe", "sk_data_ready"]),
            full(&["tcp_probe", "tcp_data_ready_fentry"]),
            full(&["tcp_probe", "tcp_data_ready_kprobe"]),
            degraded(
                &["tcp_probe"],
                "no data-ready hook: a stall's end is found at the next segment or the close; same durations, reported later",
            ),
        ],
    },
    Feature {
        name: "congestion_episodes",
        shows: "Recovery, Loss and CWR episodes and their time",
        required: false,
        ways: &[
            full(&["tcp_cong_state_set"]),
            degraded(
                &["tcp_probe"],
                "no tcp:tcp_cong_state_set: the state is read per ACK and RTO retransmission, so an episode starts and ends up to one ACK late",
            ),
        ],
    },
    // The accept-queue features: their hook families (fentry/fexit, then
    // kprobes, then tracepoints) and what each needs are in `optional.rs`.
    Feature { name: "drop_reasons", shows: "TCP drops by the kernel's reason", required: false, ways: &[] },
    Feature {
        name: "listen_overflows",
        shows: "connections dropped on a full accept queue, per listener",
        required: false,
        ways: &[],
    },
    Feature {
        name: "accept_queue",
        shows: "time in the accept queue, queue length, the accepting process",
        required: false,
        ways: &[],
    },
];

/// The feature named `name`.
pub fn named(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// How well this kernel serves a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Degraded,
    Missing,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Degraded => "degraded",
            Level::Missing => "missing",
        }
    }
}

/// A feature as served on this kernel.
#[derive(Clone, Debug)]
pub struct FeatureStatus {
    pub feature: &'static Feature,
    pub level: Level,
    /// The hooks serving it (empty when missing).
    pub hooks: Vec<String>,
    /// Why it is degraded or missing (empty when ok).
    pub why: String,
}

impl FeatureStatus {
    /// The one stderr line a degraded or missing feature gets at start.
    pub fn notice(&self) -> Option<String> {
        match self.level {
            Level::Ok => None,
            level => Some(format!("netlens: {} {}: {}", self.feature.name, level.as_str(), self.why)),
        }
    }
}

/// Picks how each feature is served. `attach(program)` attaches a program
/// (at most once per program: the caller remembers outcomes) and says why
/// it could not. Returns every feature's status, in [`FEATURES`] order.
pub fn resolve(mut attach: impl FnMut(&'static str) -> Result<String, String>) -> Vec<FeatureStatus> {
    FEATURES
        .iter()
        .filter(|feature| !feature.ways.is_empty())
        .map(|feature| {
            let mut first_failure = None;
            for way in feature.ways {
                let mut hooks = Vec::new();
                let mut failed = None;
                for program in way.programs {
                    match attach(program) {
                        Ok(hook) => hooks.push(hook),
                        Err(why) => {
                            failed = Some(why);
                            break;
                        }
                    }
                }
                match (failed, way.degraded) {
                    (None, None) => return FeatureStatus { feature, level: Level::Ok, hooks, why: String::new() },
                    (None, Some(why)) => {
                        return FeatureStatus { feature, level: Level::Degraded, hooks, why: why.to_string() }
                    }
                    (Some(why), _) => {
                        first_failure.get_or_insert(why);
                    }
                }
            }
            FeatureStatus { feature, level: Level::Missing, hooks: Vec::new(), why: first_failure.unwrap_or_default() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status<'a>(statuses: &'a [FeatureStatus], name: &str) -> &'a FeatureStatus {
        statuses.iter().find(|s| s.feature.name == name).unwrap()
    }

    #[test]
    fn every_program_is_a_known_hook() {
        for feature in FEATURES {
            for way in feature.ways {
                for program in way.programs {
                    assert!(
                        crate::loader::HOOKS.iter().any(|h| h.program == *program),
                        "{}: {program} is not in loader::HOOKS",
                        feature.name
                    );
                }
            }
        }
    }

    #[test]
    fn a_kernel_with_every_hook_serves_everything_fully() {
        let statuses = resolve(|program| Ok(program.to_string()));
        assert!(statuses.iter().all(|s| s.level == Level::Ok), "{statuses:?}");
        assert_eq!(status(&statuses, "hol_stalls").hooks, ["tcp_probe", "sk_data_ready"]);
    }

    #[test]
    fn missing_optional_hooks_fall_back_best_first() {
        // 6.1: no sk_data_ready; fentry works.
        let statuses = resolve(|p| if p == "sk_data_ready" { Err("missing".into()) } else { Ok(p.into()) });
        let hol = status(&statuses, "hol_stalls");
        assert_eq!((hol.level, hol.hooks.as_slice()), (Level::Ok, &["tcp_probe".to_string(), "tcp_data_ready_fentry".into()][..]));

        // 5.10 without fentry or kprobes: both degrade to tcp_probe.
        let lacking = ["sk_data_ready", "tcp_data_ready_fentry", "tcp_data_ready_kprobe", "tcp_cong_state_set"];
        let statuses = resolve(|p| if lacking.contains(&p) { Err(format!("{p} missing")) } else { Ok(p.into()) });
        for name in ["hol_stalls", "congestion_episodes"] {
            let s = status(&statuses, name);
            assert_eq!(s.level, Level::Degraded, "{name}");
            assert_eq!(s.hooks, ["tcp_probe"]);
            assert!(s.notice().unwrap().starts_with(&format!("netlens: {name} degraded: ")));
        }
        assert_eq!(status(&statuses, "lifecycle").level, Level::Ok);
    }

    #[test]
    fn a_feature_with_no_way_is_missing_with_the_first_reason() {
        let statuses = resolve(|p| if p == "tcp_probe" { Err("tcp_probe offsets".into()) } else { Ok(p.into()) });
        let transport = status(&statuses, "transport");
        assert_eq!((transport.level, transport.why.as_str()), (Level::Missing, "tcp_probe offsets"));
        // hol_stalls needs tcp_probe in every way.
        assert_eq!(status(&statuses, "hol_stalls").level, Level::Missing);
        // Congestion episodes still come from their tracepoint.
        assert_eq!(status(&statuses, "congestion_episodes").level, Level::Ok);
    }
}
