//! Which hosts a rolling upgrade takes, and in what order.
//!
//! One at a time, each role while the others hold it up: the database replica first (the
//! primary keeps taking writes), then the sources, the ingests (the other one carries the same
//! timeline), the broadcasts (drained first: their viewers move on their own), the LBs (pages
//! and players ask the other one); the database primary last, once a Patroni switchover has
//! made the freshly upgraded replica primary, so it is restarted as a replica and never fails
//! over by a crash.

use std::collections::BTreeSet;

use streaming_core::config::{HostEntry, Role};

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub hosts: Vec<String>,
    pub roles: Vec<Role>,
    pub all: bool,
}

/// One host's turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub host: String,
    pub role: Role,
    /// The database primary: a switchover to this replica comes first.
    pub switchover_to: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    #[error("nothing to upgrade: name hosts, a --role, or --all")]
    Nothing,
    #[error("no host named {0} in the cluster")]
    Unknown(String),
    #[error(
        "{0} is the database primary and no other db host can take over: upgrading it would stop \
         chat writes (add a second db host)"
    )]
    LonePrimary(String),
}

/// Position of a role in the order (the primary comes after everything, see [`order`]).
fn rank(role: Role) -> u8 {
    match role {
        Role::Db => 0,
        Role::Source => 1,
        Role::Ingest => 2,
        Role::Broadcast => 3,
        Role::Lb => 4,
    }
}

/// The steps for `selection` over `hosts` (the cluster's entries, in cluster.nix order),
/// `primary` being the current database primary if any.
pub fn order(
    hosts: &[HostEntry],
    selection: &Selection,
    primary: Option<&str>,
) -> Result<Vec<Step>, OrderError> {
    if !selection.all && selection.hosts.is_empty() && selection.roles.is_empty() {
        return Err(OrderError::Nothing);
    }
    if let Some(unknown) = selection
        .hosts
        .iter()
        .find(|name| !hosts.iter().any(|h| &h.name == *name))
    {
        return Err(OrderError::Unknown(unknown.clone()));
    }
    let chosen: BTreeSet<&str> = hosts
        .iter()
        .filter(|h| {
            selection.all || selection.hosts.contains(&h.name) || selection.roles.contains(&h.role)
        })
        .map(|h| h.name.as_str())
        .collect();
    let mut steps: Vec<Step> = hosts
        .iter()
        .filter(|h| chosen.contains(h.name.as_str()) && Some(h.name.as_str()) != primary)
        .map(|h| Step {
            host: h.name.clone(),
            role: h.role,
            switchover_to: None,
        })
        .collect();
    // Stable: hosts of one role keep the list's order.
    steps.sort_by_key(|s| rank(s.role));
    if let Some(primary) = primary.filter(|p| chosen.contains(p)) {
        // The replica that takes over: one upgraded in this run if any, else any other.
        let replicas: Vec<&HostEntry> = hosts
            .iter()
            .filter(|h| h.role == Role::Db && h.name != primary)
            .collect();
        let successor = replicas
            .iter()
            .find(|h| chosen.contains(h.name.as_str()))
            .or(replicas.first())
            .ok_or_else(|| OrderError::LonePrimary(primary.to_owned()))?;
        steps.push(Step {
            host: primary.to_owned(),
            role: Role::Db,
            switchover_to: Some(successor.name.clone()),
        });
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, role: Role) -> HostEntry {
        let role = serde_json::to_value(role).unwrap();
        let json = streaming_core::fixture::host(name, role.as_str().unwrap(), "127.0.0.1");
        serde_json::from_value(json).unwrap()
    }

    fn cluster() -> Vec<HostEntry> {
        vec![
            entry("lb1", Role::Lb),
            entry("lb2", Role::Lb),
            entry("broadcast1", Role::Broadcast),
            entry("broadcast2", Role::Broadcast),
            entry("ingest1", Role::Ingest),
            entry("db1", Role::Db),
            entry("db2", Role::Db),
            entry("source1", Role::Source),
        ]
    }

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.host.as_str()).collect()
    }

    #[test]
    fn everything_replica_first_primary_last_after_a_switchover() {
        let all = Selection {
            all: true,
            ..Default::default()
        };
        let steps = order(&cluster(), &all, Some("db1")).unwrap();
        assert_eq!(
            names(&steps),
            [
                "db2",
                "source1",
                "ingest1",
                "broadcast1",
                "broadcast2",
                "lb1",
                "lb2",
                "db1"
            ]
        );
        assert_eq!(steps[7].switchover_to.as_deref(), Some("db2"));
        assert!(steps[..7].iter().all(|s| s.switchover_to.is_none()));
    }

    #[test]
    fn a_selection_keeps_the_safe_order() {
        let some = Selection {
            hosts: vec!["lb2".into(), "db1".into()],
            roles: vec![Role::Broadcast],
            all: false,
        };
        let steps = order(&cluster(), &some, Some("db1")).unwrap();
        assert_eq!(names(&steps), ["broadcast1", "broadcast2", "lb2", "db1"]);
        // db2 was not upgraded in this run: it still takes over, a switchover needs no upgrade.
        assert_eq!(steps[3].switchover_to.as_deref(), Some("db2"));
        let replica_only = Selection {
            hosts: vec!["db2".into()],
            ..Default::default()
        };
        assert_eq!(
            order(&cluster(), &replica_only, Some("db1")).unwrap(),
            [Step {
                host: "db2".into(),
                role: Role::Db,
                switchover_to: None
            }]
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(
            order(&cluster(), &Selection::default(), None),
            Err(OrderError::Nothing)
        );
        let typo = Selection {
            hosts: vec!["lb9".into()],
            ..Default::default()
        };
        assert_eq!(
            order(&cluster(), &typo, None),
            Err(OrderError::Unknown("lb9".into()))
        );
        let lone = vec![entry("lb1", Role::Lb), entry("db1", Role::Db)];
        let dbs = Selection {
            roles: vec![Role::Db],
            ..Default::default()
        };
        assert_eq!(
            order(&lone, &dbs, Some("db1")),
            Err(OrderError::LonePrimary("db1".into()))
        );
    }
}
