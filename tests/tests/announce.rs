//! The announcer on its own, in a namespace: nb's routes go into the announce table and out
//! again, a route someone else put there is never overwritten or removed, and a new
//! announcer clears what an earlier one left (README "A fleet of balancers").

use std::{collections::BTreeSet, net::IpAddr};

use nb_agent::announce::Announcer;
use nb_tests::{netns::Netns, require_root};

fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
    addrs.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn routes_of_others_are_left_alone_and_leftovers_are_cleared() {
    require_root();
    let ns = Netns::new("an");
    // The operator's own route for an address nb would announce, in the same table.
    ns.sh("ip route add 198.18.100.2/32 dev lo table 100 proto static");
    let mut a = ns.enter(|| Announcer::open(100).expect("open"));
    a.set(&set(&["198.18.100.1", "2001:db8:100::1"]))
        .expect("announce");
    let table = |ns: &Netns| ns.sh("ip route show table 100; ip -6 route show table 100");
    let t = table(&ns);
    assert!(t.contains("198.18.100.1 dev lo proto 211"), "{t}");
    assert!(t.contains("2001:db8:100::1 dev lo proto 211"), "{t}");

    // Announcing the address the operator's route holds fails for that address alone: the
    // rest of the change is made, and the operator's route stays as it was.
    let e = a
        .set(&set(&["198.18.100.1", "198.18.100.2"]))
        .expect_err("someone else's route");
    assert!(e.to_string().contains("198.18.100.2"), "{e}");
    let t = table(&ns);
    assert!(t.contains("198.18.100.2 dev lo proto static"), "kept: {t}");
    assert!(!t.contains("2001:db8:100::1"), "withdrawn: {t}");
    assert_eq!(a.announced(), &set(&["198.18.100.1"]));

    // A crash leaves nb's routes; the next announcer removes them, not the operator's.
    drop(a);
    let mut b = ns.enter(|| Announcer::open(100).expect("open again"));
    assert!(b.announced().is_empty());
    let t = table(&ns);
    assert!(!t.contains("proto 211"), "leftovers cleared: {t}");
    assert!(t.contains("198.18.100.2 dev lo proto static"), "kept: {t}");

    // Withdrawing everything leaves the operator's route too.
    b.set(&set(&["198.18.100.1"])).expect("announce");
    b.set(&BTreeSet::new()).expect("withdraw");
    let t = table(&ns);
    assert!(!t.contains("proto 211"), "{t}");
    assert!(t.contains("198.18.100.2 dev lo proto static"), "{t}");
}
