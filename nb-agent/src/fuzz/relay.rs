//! The relay's request head reader and rewriter (`proxy::relay`): what it takes from a client
//! and what it sends a node. It must never panic, take a head only when the head is whole and
//! unambiguous (hyper gets everything else, and answers it), and send the node a head that a
//! strict parser reads back as the same request: same method and target, exactly one Host,
//! no framing or hop-by-hop fields, and the balancer's own X-Forwarded-* fields once each.

use proptest::prelude::*;

use super::request_heads::{Field, RequestHead, request_head, well_formed_request_head};
use crate::proxy::relay::fuzzing::{Outcome, read};

/// Field names the node must never get from the relay as the client sent them.
const NEVER_TO_THE_NODE: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
];

/// Checks the head the relay sends a node for the request `head` (the client's bytes).
fn check_rewrite(client: &[u8], used: usize, sent: &[u8]) -> Result<(), TestCaseError> {
    // The client's head, as a strict parser reads it.
    let mut cf = [httparse::EMPTY_HEADER; 128];
    let mut creq = httparse::Request::new(&mut cf);
    let clen = match creq.parse(client) {
        Ok(httparse::Status::Complete(n)) => n,
        r => {
            return Err(TestCaseError::fail(format!(
                "taken, but httparse says {r:?}"
            )));
        }
    };
    prop_assert_eq!(used, clen, "the head's length");
    let hosts: Vec<&[u8]> = creq
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value)
        .collect();
    prop_assert_eq!(hosts.len(), 1, "taken with {} Host fields", hosts.len());
    for h in creq.headers.iter() {
        for framing in ["content-length", "transfer-encoding", "upgrade", "expect"] {
            prop_assert!(
                !h.name.eq_ignore_ascii_case(framing),
                "taken with {}",
                framing
            );
        }
    }
    // What the node gets.
    let mut nf = [httparse::EMPTY_HEADER; 160];
    let mut nreq = httparse::Request::new(&mut nf);
    let nlen = match nreq.parse(sent) {
        Ok(httparse::Status::Complete(n)) => n,
        r => {
            return Err(TestCaseError::fail(format!(
                "the node's head does not parse: {r:?}: {:?}",
                String::from_utf8_lossy(sent)
            )));
        }
    };
    prop_assert_eq!(nlen, sent.len(), "one head, nothing after it");
    prop_assert_eq!(nreq.method, creq.method);
    prop_assert_eq!(nreq.path, creq.path);
    prop_assert_eq!(nreq.version, Some(1));
    let count = |name: &str| {
        nreq.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    prop_assert_eq!(count("host"), 1);
    prop_assert_eq!(
        nreq.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("host"))
            .map(|h| h.value),
        Some(hosts[0]),
        "Host untouched"
    );
    for name in NEVER_TO_THE_NODE {
        prop_assert_eq!(count(name), 0, "{} sent to the node", name);
    }
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-port"] {
        prop_assert_eq!(count(name), 1, "{}", name);
    }
    let body_methods = matches!(creq.method, Some("POST" | "PUT" | "PATCH"));
    prop_assert_eq!(count("content-length"), usize::from(body_methods));
    Ok(())
}

/// Runs `read` on `wire` and checks what it did.
fn check(wire: &[u8], h: Option<&RequestHead>) -> Result<(), TestCaseError> {
    match read(wire) {
        Outcome::Whole(used, sent) => {
            if let Some(h) = h {
                let irr = h.irregular();
                prop_assert!(
                    !irr.duplicate_framing && !irr.control && !irr.unended && !irr.obs_fold,
                    "taken despite {:?}",
                    irr
                );
            }
            check_rewrite(wire, used, &sent)
        }
        Outcome::Partial | Outcome::Other => Ok(()),
    }
}

/// Well-formed heads with one Host more often than the shared generator makes them (it
/// picks field names from a list of twenty): the ones the relay should take.
fn hosted_head() -> impl Strategy<Value = RequestHead> {
    (
        well_formed_request_head(),
        any::<prop::sample::Index>(),
        "[a-z]{1,10}(\\.[a-z]{2,3})?(:[0-9]{1,5})?",
        any::<bool>(),
    )
        .prop_map(|(mut h, at, host, bodiless)| {
            if bodiless {
                h.fields.retain(|f| {
                    !["content-length", "transfer-encoding", "upgrade", "expect"]
                        .iter()
                        .any(|n| f.name.eq_ignore_ascii_case(n))
                });
            }
            if h.count("host") == 0 {
                let field = Field {
                    name: "Host".into(),
                    colon: ": ",
                    value: host,
                    fold: None,
                    eol: "\r\n",
                };
                h.fields.insert(at.index(h.fields.len() + 1), field);
            }
            h
        })
}

proptest! {
    #![proptest_config(super::settings(2048))]

    /// Any bytes: no panic, and whatever is taken is a whole, unambiguous head.
    #[test]
    fn any_bytes(wire in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&wire, None)?;
    }

    /// Generated heads, irregular ones included: the irregular ones go to hyper, the taken
    /// ones reach the node rewritten and unambiguous.
    #[test]
    fn generated_heads(h in request_head()) {
        check(&h.encode(), Some(&h))?;
    }

    /// A well-formed HTTP/1.1 head without a body, with one Host and an origin-form target,
    /// is taken (not handed to hyper), and reaches the node as checked above.
    #[test]
    fn well_formed_bodiless_heads_are_taken(h in hosted_head()) {
        let plain = h.version == "HTTP/1.1"
            && h.method != "CONNECT"
            && h.target.starts_with('/')
            && h.count("host") == 1
            && ["content-length", "transfer-encoding", "upgrade", "expect"]
                .iter()
                .all(|n| h.count(n) == 0)
            && h.fields.len() < 90;
        let wire = h.encode();
        match read(&wire) {
            Outcome::Whole(used, sent) => check_rewrite(&wire, used, &sent)?,
            r => prop_assert!(!plain, "{:?}: {:?}", String::from_utf8_lossy(&wire), r),
        }
    }

    /// A head cut anywhere is never taken (it is partial, or hyper's).
    #[test]
    fn cut_heads_are_never_taken(h in well_formed_request_head(), cut in any::<prop::sample::Index>()) {
        let wire = h.encode();
        let at = cut.index(wire.len());
        if at < wire.len() {
            let r = read(&wire[..at]);
            prop_assert!(!matches!(r, Outcome::Whole(..)), "taken at {} of {}: {:?}", at, wire.len(), r);
        }
    }
}
