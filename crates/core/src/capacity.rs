//! Headroom of the broadcasts as a whole, and with the largest one gone.
//!
//! The failover promise needs N-1 capacity: when a broadcast dies its viewers move to the
//! others within seconds, so the cluster holds its audience only if the rest have room for
//! them. The LBs report this on `/api/stats`, and `streamctl plan` computes it for a target
//! audience before any viewer comes; both use this one rule.

use serde::Serialize;

/// One broadcast as counted for headroom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastLoad {
    pub name: String,
    /// Viewers of the top rendition that fit under 80 % of its uplink
    /// ([`crate::status::viewer_capacity`]).
    pub capacity: u64,
    pub viewers: u64,
    /// Takes new viewers (alive and not draining). A draining broadcast's viewers count, its
    /// room does not: they are about to move.
    pub serving: bool,
}

/// Room for viewers on the serving broadcasts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Headroom {
    pub capacity: u64,
    pub viewers: u64,
    /// `capacity - viewers`, negative when the audience already does not fit.
    pub free: i64,
    /// Viewers as a share of capacity (1.0 = the 80 % uplink rule reached); 0 with no capacity.
    pub fill: f64,
    /// The same with the largest serving broadcast down; `None` with fewer than two serving.
    pub without_largest: Option<WithoutLargest>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WithoutLargest {
    /// The broadcast whose failure moves the most room away.
    pub name: String,
    pub capacity: u64,
    /// Negative: this many viewers would find no room after its failure.
    pub free: i64,
    /// Its viewers and everyone else's fit on the others.
    pub holds: bool,
}

/// Headroom now and after losing the largest serving broadcast (ties: the first by name).
pub fn headroom(broadcasts: &[BroadcastLoad]) -> Headroom {
    let serving: Vec<&BroadcastLoad> = broadcasts.iter().filter(|b| b.serving).collect();
    let capacity: u64 = serving.iter().map(|b| b.capacity).sum();
    let viewers: u64 = broadcasts.iter().map(|b| b.viewers).sum();
    let free = signed(capacity) - signed(viewers);
    let fill = if capacity == 0 {
        0.0
    } else {
        viewers as f64 / capacity as f64
    };
    let largest = serving
        .iter()
        .copied()
        .fold(None::<&BroadcastLoad>, |best, b| match best {
            Some(x)
                if x.capacity > b.capacity || (x.capacity == b.capacity && x.name <= b.name) =>
            {
                Some(x)
            }
            _ => Some(b),
        });
    let without_largest = largest.filter(|_| serving.len() >= 2).map(|l| {
        let capacity = capacity - l.capacity;
        let free = signed(capacity) - signed(viewers);
        WithoutLargest {
            name: l.name.clone(),
            capacity,
            free,
            holds: free >= 0,
        }
    });
    Headroom {
        capacity,
        viewers,
        free,
        fill,
        without_largest,
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, capacity: u64, viewers: u64, serving: bool) -> BroadcastLoad {
        BroadcastLoad {
            name: name.into(),
            capacity,
            viewers,
            serving,
        }
    }

    #[test]
    fn losing_the_big_broadcast_is_what_counts() {
        // The default list: three 1 Gbit/s broadcasts and one 10 Gbit/s one, top rendition
        // 5.6 Mbit/s: 142 and 1,428 viewers.
        let list = [
            b("broadcast1", 142, 100, true),
            b("broadcast2", 142, 100, true),
            b("broadcast3", 1428, 1000, true),
            b("broadcast4", 142, 100, true),
        ];
        let h = headroom(&list);
        assert_eq!((h.capacity, h.viewers, h.free), (1854, 1300, 554));
        assert!((h.fill - 1300.0 / 1854.0).abs() < 1e-9);
        let w = h.without_largest.unwrap();
        assert_eq!(w.name, "broadcast3");
        assert_eq!((w.capacity, w.free, w.holds), (426, -874, false));
        // A small audience holds even without it.
        let small: Vec<_> = list
            .iter()
            .map(|x| BroadcastLoad {
                viewers: x.viewers / 10,
                ..x.clone()
            })
            .collect();
        let w = headroom(&small).without_largest.unwrap();
        assert_eq!((w.free, w.holds), (426 - 130, true));
    }

    #[test]
    fn draining_viewers_count_but_their_room_does_not() {
        let list = [
            b("broadcast1", 100, 40, false),
            b("broadcast2", 100, 10, true),
            b("broadcast3", 100, 10, true),
        ];
        let h = headroom(&list);
        assert_eq!((h.capacity, h.viewers, h.free), (200, 60, 140));
        let w = h.without_largest.unwrap();
        // Equal capacities: the first by name goes.
        assert_eq!(
            (w.name.as_str(), w.capacity, w.free),
            ("broadcast2", 100, 40)
        );
    }

    #[test]
    fn fewer_than_two_serving_has_no_n_minus_one() {
        let h = headroom(&[
            b("broadcast1", 100, 120, true),
            b("broadcast2", 50, 0, false),
        ]);
        assert_eq!((h.capacity, h.free), (100, -20));
        assert!(h.without_largest.is_none());
        let h = headroom(&[]);
        assert_eq!((h.capacity, h.viewers, h.free, h.fill), (0, 0, 0, 0.0));
        assert!(h.without_largest.is_none());
    }
}
