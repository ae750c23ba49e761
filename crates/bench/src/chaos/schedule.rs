//! The fault schedule of `streamctl bench chaos`, drawn from a seed.
//!
//! The generator is ChaCha8 seeded with the seed's bytes, and every draw maps a raw `u64` to a
//! range with one fixed formula (no `rand` distribution, whose algorithms may change between
//! versions), so a seed gives the same schedule on any machine for a given host list and
//! version of this file. Adding a fault kind changes what a seed draws: the report always
//! prints the schedule it ran.

use std::fmt;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use serde::Serialize;
use streaming_core::config::Role;

/// A host the schedule may fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub name: String,
    pub role: Role,
    /// Carries an etcd member (db hosts and the witness).
    pub etcd: bool,
}

/// How a host fails. Each kind has its inject and restore in [`super::inject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// SIGKILL of the host's whole process group; restored by `streamctl start`.
    Kill,
    /// SIGSTOP of the host (sockets stay open, nothing answers); `streamctl start` resumes it.
    Hang,
    /// The service alone dies: SIGABRT, and the runner restarts it as systemd would; on a db
    /// host, SIGKILL of Patroni and PostgreSQL (etcd stays), which `streamctl start` runs again.
    Crash,
    /// A network partition of the host ([`Shape`]); `streamctl heal` lifts it.
    Partition,
}

/// Every kind, in draw order (a schedule draws from those asked for, in this order).
pub const KINDS: [Kind; 4] = [Kind::Kill, Kind::Hang, Kind::Crash, Kind::Partition];

/// What a partition cuts the host off from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Everyone: the other hosts, viewers and chat clients, operator commands.
    Everyone,
    /// A broadcast cut from the LBs only: it still reaches its ingests and serves its viewers.
    FromLbs,
    /// An ingest cut from its peer ingest only: it still serves the broadcasts.
    FromPeer,
    /// The database primary of the moment (whichever db host was drawn) cut from the replica
    /// and every etcd member: no acked write may be lost, never two writable primaries.
    PrimaryFromReplicaAndEtcd,
}

impl Shape {
    /// The shapes a host of `role` can be cut in, in draw order.
    pub fn of(role: Role) -> &'static [Shape] {
        match role {
            Role::Broadcast => &[Shape::Everyone, Shape::FromLbs],
            Role::Ingest => &[Shape::Everyone, Shape::FromPeer],
            Role::Db => &[Shape::Everyone, Shape::PrimaryFromReplicaAndEtcd],
            _ => &[Shape::Everyone],
        }
    }

    /// The `from` words of `streamctl partition` (hosts or roles; empty: everyone).
    pub fn from_words(self, role: Role, hosts: &[Target]) -> Vec<String> {
        match self {
            Shape::Everyone => Vec::new(),
            Shape::FromLbs => vec![Role::Lb.as_str().to_owned()],
            Shape::FromPeer => vec![role.as_str().to_owned()],
            Shape::PrimaryFromReplicaAndEtcd => std::iter::once(Role::Db.as_str().to_owned())
                .chain(
                    hosts
                        .iter()
                        .filter(|h| h.etcd && h.role != Role::Db)
                        .map(|h| h.name.clone()),
                )
                .collect(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Kill => "kill",
            Kind::Hang => "hang",
            Kind::Crash => "crash",
            Kind::Partition => "cut",
        })
    }
}

/// One fault of a step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    pub host: String,
    pub role: Role,
    pub kind: Kind,
    /// Partitions: what the host is cut off from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// Seconds after the step's first fault that this one starts (0 for the first).
    pub start_s: f64,
    /// Seconds from its start until it is restored (a crash restores itself: the runner).
    pub restore_after_s: f64,
}

impl Fault {
    /// The runner restarts a crashed service by itself: nobody restores it, and its drawn
    /// duration is not used.
    pub fn restores_itself(&self) -> bool {
        self.kind == Kind::Crash && self.role != Role::Db
    }

    /// Seconds from the step's first fault until this one is over (restored, or crashed).
    pub fn end_s(&self) -> f64 {
        if self.restores_itself() {
            self.start_s
        } else {
            self.start_s + self.restore_after_s
        }
    }
}

impl Fault {
    /// "kill broadcast2", "cut ingest1 from its peer".
    pub fn label(&self) -> String {
        match self.shape {
            None => format!("{} {}", self.kind, self.host),
            Some(Shape::Everyone) => format!("cut {} from everyone", self.host),
            Some(Shape::FromLbs) => format!("cut {} from the LBs", self.host),
            Some(Shape::FromPeer) => format!("cut {} from its peer", self.host),
            Some(Shape::PrimaryFromReplicaAndEtcd) => {
                "cut the db primary from the replica and etcd".to_owned()
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())?;
        if self.start_s > 0.0 {
            write!(f, " at +{:.1} s", self.start_s)?;
        }
        if !self.restores_itself() {
            write!(f, " for {:.1} s", self.restore_after_s)?;
        }
        Ok(())
    }
}

/// Faults that happen together; the cluster is whole again before the next step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// From 1.
    pub number: usize,
    pub faults: Vec<Fault>,
}

impl Step {
    /// Seconds from the first fault until the last restore.
    pub fn length_s(&self) -> f64 {
        self.faults.iter().map(Fault::end_s).fold(0.0, f64::max)
    }

    pub fn label(&self) -> String {
        self.faults
            .iter()
            .map(Fault::label)
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// The bounds of the draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bounds {
    /// Each fault lasts between these (seconds, drawn in tenths).
    pub min_fault_s: f64,
    pub max_fault_s: f64,
    /// Share of steps that are pairs (0 to 1).
    pub pair_share: f64,
    /// The second fault of a pair starts up to this many seconds after the first.
    pub max_pair_offset_s: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("no host can be faulted: every role needs at least two hosts for one of them to fail")]
    NothingToFault,
    #[error("fault durations: need 0 < min <= max (got {min} and {max})")]
    BadDurations { min: f64, max: f64 },
    #[error("no fault kind to draw from")]
    NoKinds,
}

/// Why a set of simultaneous faults is not allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Violation {
    #[error("{0} is faulted twice")]
    SameHost(String),
    #[error("two faults on role {0}")]
    SameRole(String),
    #[error("every {0} host would be down")]
    WholeRole(String),
    #[error("{down} of {members} etcd members would be down: no quorum")]
    EtcdQuorum { down: usize, members: usize },
}

/// The invariant of every step: what the cluster promises to survive, and nothing more.
///
/// - Faults of one step hit different roles (a single host of each), so no step is "two
///   broadcasts at once", which is a capacity question rather than a failover.
/// - A role never loses all its hosts: its service would be gone by design.
/// - A majority of etcd members stays up (a fault on a host with a member counts as the member
///   down, whatever the kind): without quorum Patroni demotes the primary and chat stops for
///   as long as the fault lasts, again by design.
pub fn allowed(faults: &[&Fault], hosts: &[Target]) -> Result<(), Violation> {
    for (i, f) in faults.iter().enumerate() {
        if faults[..i].iter().any(|g| g.host == f.host) {
            return Err(Violation::SameHost(f.host.clone()));
        }
        if faults[..i].iter().any(|g| g.role == f.role) {
            return Err(Violation::SameRole(f.role.as_str().to_owned()));
        }
        // One fault per role (above), so the role is whole-down only if it has one host.
        if hosts.iter().filter(|h| h.role == f.role).count() <= 1 {
            return Err(Violation::WholeRole(f.role.as_str().to_owned()));
        }
    }
    let members = hosts.iter().filter(|h| h.etcd).count();
    let down = faults
        .iter()
        .filter(|f| hosts.iter().any(|h| h.name == f.host && h.etcd))
        .count();
    if members > 0 && down * 2 >= members {
        return Err(Violation::EtcdQuorum { down, members });
    }
    Ok(())
}

/// The draws: a fixed algorithm and fixed formulas.
struct Draw(ChaCha8Rng);

impl Draw {
    fn new(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Self(ChaCha8Rng::from_seed(bytes))
    }

    /// Uniform in `0..n` (n > 0) by widening multiplication; the bias is below 2^-32 for any n
    /// we use.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.0.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in [min, max], in tenths of a second.
    fn tenths(&mut self, min: f64, max: f64) -> f64 {
        let (lo, hi) = ((min * 10.0).round() as usize, (max * 10.0).round() as usize);
        (lo + self.below(hi.saturating_sub(lo) + 1)) as f64 / 10.0
    }

    /// True with probability `share`, in thousandths.
    fn chance(&mut self, share: f64) -> bool {
        self.below(1000) < (share.clamp(0.0, 1.0) * 1000.0).round() as usize
    }
}

/// `faults` faults of `kinds` from `seed`, in steps of one or two; `hosts` in a fixed order
/// (by name).
pub fn schedule(
    seed: u64,
    faults: usize,
    hosts: &[Target],
    kinds: &[Kind],
    bounds: &Bounds,
) -> Result<Vec<Step>, ScheduleError> {
    let kinds: Vec<Kind> = KINDS.into_iter().filter(|k| kinds.contains(k)).collect();
    if kinds.is_empty() {
        return Err(ScheduleError::NoKinds);
    }
    // `heal` lifts every cut a host is part of, so a second cut in the step could end the
    // first one early: the second fault of a pair is never a partition when the first is.
    let after_cut: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != Kind::Partition)
        .collect();
    if !(bounds.min_fault_s > 0.0 && bounds.min_fault_s <= bounds.max_fault_s) {
        return Err(ScheduleError::BadDurations {
            min: bounds.min_fault_s,
            max: bounds.max_fault_s,
        });
    }
    let candidates: Vec<&Target> = hosts
        .iter()
        .filter(|h| {
            let probe = Fault {
                host: h.name.clone(),
                role: h.role,
                kind: Kind::Kill,
                shape: None,
                start_s: 0.0,
                restore_after_s: 0.0,
            };
            allowed(&[&probe], hosts).is_ok()
        })
        .collect();
    if candidates.is_empty() {
        return Err(ScheduleError::NothingToFault);
    }
    let mut draw = Draw::new(seed);
    let mut steps = Vec::new();
    let mut left = faults;
    while left > 0 {
        let i = draw.below(candidates.len());
        let first = pick(&mut draw, candidates[i], &kinds, bounds);
        let mut step = vec![first];
        let second_kinds = if step[0].kind == Kind::Partition {
            &after_cut
        } else {
            &kinds
        };
        if left >= 2 && !second_kinds.is_empty() && draw.chance(bounds.pair_share) {
            let mut second: Vec<Fault> = candidates
                .iter()
                .map(|h| Fault {
                    host: h.name.clone(),
                    role: h.role,
                    kind: Kind::Kill,
                    shape: None,
                    start_s: 0.0,
                    restore_after_s: 0.0,
                })
                .filter(|f| allowed(&[&step[0], f], hosts).is_ok())
                .collect();
            if !second.is_empty() {
                let i = draw.below(second.len());
                let mut f = second.swap_remove(i);
                f.kind = second_kinds[draw.below(second_kinds.len())];
                f.shape = draw_shape(&mut draw, f.kind, f.role);
                f.start_s = draw.tenths(0.0, bounds.max_pair_offset_s);
                f.restore_after_s = draw.tenths(bounds.min_fault_s, bounds.max_fault_s);
                step.push(f);
            }
        }
        left -= step.len();
        steps.push(Step {
            number: steps.len() + 1,
            faults: step,
        });
    }
    Ok(steps)
}

fn pick(draw: &mut Draw, host: &Target, kinds: &[Kind], bounds: &Bounds) -> Fault {
    let kind = kinds[draw.below(kinds.len())];
    let shape = draw_shape(draw, kind, host.role);
    Fault {
        host: host.name.clone(),
        role: host.role,
        kind,
        shape,
        start_s: 0.0,
        restore_after_s: draw.tenths(bounds.min_fault_s, bounds.max_fault_s),
    }
}

/// Partitions only (no draw otherwise, so schedules without them keep their draws).
fn draw_shape(draw: &mut Draw, kind: Kind, role: Role) -> Option<Shape> {
    (kind == Kind::Partition).then(|| {
        let shapes = Shape::of(role);
        shapes[draw.below(shapes.len())]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<Target> {
        let t = |name: &str, role, etcd| Target {
            name: name.into(),
            role,
            etcd,
        };
        vec![
            t("broadcast1", Role::Broadcast, false),
            t("broadcast2", Role::Broadcast, false),
            t("broadcast3", Role::Broadcast, false),
            t("broadcast4", Role::Broadcast, false),
            t("db1", Role::Db, true),
            t("db2", Role::Db, true),
            t("ingest1", Role::Ingest, false),
            t("ingest2", Role::Ingest, false),
            t("lb1", Role::Lb, true),
            t("lb2", Role::Lb, false),
            t("source1", Role::Source, false),
            t("source2", Role::Source, false),
        ]
    }

    const BOUNDS: Bounds = Bounds {
        min_fault_s: 4.0,
        max_fault_s: 12.0,
        pair_share: 0.4,
        max_pair_offset_s: 2.0,
    };

    fn fault(host: &str, role: Role) -> Fault {
        Fault {
            host: host.into(),
            role,
            kind: Kind::Kill,
            shape: None,
            start_s: 0.0,
            restore_after_s: 5.0,
        }
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let a = schedule(7, 100, &cluster(), &KINDS, &BOUNDS).unwrap();
        let b = schedule(7, 100, &cluster(), &KINDS, &BOUNDS).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, schedule(8, 100, &cluster(), &KINDS, &BOUNDS).unwrap());
    }

    #[test]
    fn the_first_steps_of_seed_1_are_fixed() {
        // Pins the algorithm: a change here breaks every published seed. Without partitions,
        // schedules draw what they drew before partitions existed.
        let steps = schedule(
            1,
            6,
            &cluster(),
            &[Kind::Kill, Kind::Hang, Kind::Crash],
            &BOUNDS,
        )
        .unwrap();
        let labels: Vec<String> = steps.iter().map(Step::label).collect();
        assert_eq!(
            labels,
            [
                "kill db1",
                "kill source1",
                "hang db1 + crash broadcast4",
                "kill source2",
                "crash lb1"
            ],
            "{steps:#?}"
        );
        assert_eq!(steps[4].faults[0].restore_after_s, 4.2);
    }

    #[test]
    fn the_first_steps_of_seed_1_with_partitions_are_fixed() {
        let steps = schedule(1, 6, &cluster(), &KINDS, &BOUNDS).unwrap();
        let labels: Vec<String> = steps.iter().map(Step::label).collect();
        assert_eq!(labels, PINNED, "{steps:#?}");
    }

    const PINNED: [&str; 5] = [
        "hang db1",
        "kill source1",
        "hang db1 + cut broadcast4 from everyone",
        "cut broadcast4 from the LBs",
        "kill broadcast1",
    ];

    #[test]
    fn partitions_come_in_every_shape_and_never_two_in_a_step() {
        let hosts = cluster();
        let steps = schedule(4, 300, &hosts, &KINDS, &BOUNDS).unwrap();
        let all: Vec<&Fault> = steps.iter().flat_map(|s| &s.faults).collect();
        for shape in [
            Shape::Everyone,
            Shape::FromLbs,
            Shape::FromPeer,
            Shape::PrimaryFromReplicaAndEtcd,
        ] {
            assert!(all.iter().any(|f| f.shape == Some(shape)), "{shape:?}");
        }
        for f in &all {
            assert_eq!(f.shape.is_some(), f.kind == Kind::Partition, "{f:?}");
            if let Some(shape) = f.shape {
                assert!(Shape::of(f.role).contains(&shape), "{f:?}");
            }
        }
        for s in &steps {
            let cuts = s
                .faults
                .iter()
                .filter(|f| f.kind == Kind::Partition)
                .count();
            assert!(cuts <= 1, "{s:?}");
        }
        assert_eq!(
            Shape::PrimaryFromReplicaAndEtcd.from_words(Role::Db, &hosts),
            ["db", "lb1"]
        );
        assert_eq!(Shape::FromPeer.from_words(Role::Ingest, &hosts), ["ingest"]);
        assert_eq!(Shape::FromLbs.from_words(Role::Broadcast, &hosts), ["lb"]);
        assert!(Shape::Everyone.from_words(Role::Lb, &hosts).is_empty());
    }

    #[test]
    fn counts_faults_and_respects_bounds_and_the_invariant() {
        let hosts = cluster();
        for seed in 0..50 {
            let steps = schedule(seed, 25, &hosts, &KINDS, &BOUNDS).unwrap();
            let total: usize = steps.iter().map(|s| s.faults.len()).sum();
            assert_eq!(total, 25);
            for s in &steps {
                assert!((1..=2).contains(&s.faults.len()));
                let refs: Vec<&Fault> = s.faults.iter().collect();
                assert_eq!(allowed(&refs, &hosts), Ok(()), "{s:?}");
                for f in &s.faults {
                    assert!((4.0..=12.0).contains(&f.restore_after_s), "{f:?}");
                    assert!((0.0..=2.0).contains(&f.start_s), "{f:?}");
                }
            }
        }
    }

    #[test]
    fn pairs_happen_and_every_kind_and_role_is_drawn() {
        let steps = schedule(3, 200, &cluster(), &KINDS, &BOUNDS).unwrap();
        let pairs = steps.iter().filter(|s| s.faults.len() == 2).count();
        assert!(pairs > 20 && pairs < steps.len(), "{pairs} pairs");
        let all: Vec<&Fault> = steps.iter().flat_map(|s| &s.faults).collect();
        for kind in KINDS {
            assert!(all.iter().any(|f| f.kind == kind), "{kind} never drawn");
        }
        for role in [
            Role::Lb,
            Role::Broadcast,
            Role::Db,
            Role::Ingest,
            Role::Source,
        ] {
            assert!(all.iter().any(|f| f.role == role), "{role:?} never drawn");
        }
    }

    #[test]
    fn the_invariant_refuses_what_the_cluster_does_not_promise() {
        let hosts = cluster();
        let (b1, b2) = (
            fault("broadcast1", Role::Broadcast),
            fault("broadcast2", Role::Broadcast),
        );
        assert_eq!(
            allowed(&[&b1, &b2], &hosts),
            Err(Violation::SameRole("broadcast".into()))
        );
        assert_eq!(
            allowed(&[&b1, &b1], &hosts),
            Err(Violation::SameHost("broadcast1".into()))
        );
        // lb1 carries the etcd witness: with a db host, two of three members are gone.
        let (lb1, db1) = (fault("lb1", Role::Lb), fault("db1", Role::Db));
        assert_eq!(
            allowed(&[&lb1, &db1], &hosts),
            Err(Violation::EtcdQuorum {
                down: 2,
                members: 3
            })
        );
        assert_eq!(allowed(&[&fault("lb2", Role::Lb), &db1], &hosts), Ok(()));
        assert_eq!(allowed(&[&lb1, &b1], &hosts), Ok(()));
        // A role of one host is never faulted.
        let mut one_lb = hosts.clone();
        one_lb.retain(|h| h.name != "lb2");
        assert_eq!(
            allowed(&[&lb1], &one_lb),
            Err(Violation::WholeRole("lb".into()))
        );
        let steps = schedule(5, 60, &one_lb, &KINDS, &BOUNDS).unwrap();
        assert!(
            steps
                .iter()
                .flat_map(|s| &s.faults)
                .all(|f| f.host != "lb1")
        );
    }

    #[test]
    fn refuses_what_it_cannot_schedule() {
        let lone = vec![Target {
            name: "lb1".into(),
            role: Role::Lb,
            etcd: false,
        }];
        assert_eq!(
            schedule(1, 3, &lone, &KINDS, &BOUNDS),
            Err(ScheduleError::NothingToFault)
        );
        let bad = Bounds {
            min_fault_s: 5.0,
            max_fault_s: 2.0,
            ..BOUNDS
        };
        assert!(matches!(
            schedule(1, 3, &cluster(), &KINDS, &bad),
            Err(ScheduleError::BadDurations { .. })
        ));
    }
}
