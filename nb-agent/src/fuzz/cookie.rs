//! The `NB_SRVID` cookie: what clients send back is arbitrary text, so [`CookieKey::verify`],
//! [`find`] and [`strip`] must take anything without a panic, only the exact value
//! [`CookieKey::sign`] made may verify (a second spelling of a valid cookie is a second
//! cookie nobody issued), and the backend must never see the balancer's cookie.

use proptest::prelude::*;

use crate::proxy::cookie::{COOKIE_NAME, CookieKey, find, set_cookie, strip};

/// Node labels as the config allows them (1 to 64 of letters, digits, '_', '.', '-').
pub(crate) fn label() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,64}"
}

/// Text of the kinds a Cookie header brings: cookie-ish syntax, hex, dots, quotes, spaces,
/// and any Unicode at all.
fn cookie_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_ =;.\"+-]{0,80}",
        "[0-9a-fA-F.+-]{0,48}",
        "\\PC{0,40}",
        any::<String>(),
    ]
}

/// One cookie pair as clients write them, with any spacing around its parts.
fn pair() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            3 => "[A-Za-z_][A-Za-z0-9_]{0,10}",
            1 => Just(COOKIE_NAME.to_string()),
            1 => Just(COOKIE_NAME.to_lowercase()),
            1 => Just(format!("{COOKIE_NAME}x")),
        ],
        "[ \t]{0,2}",
        "[ \t]{0,2}",
        "[A-Za-z0-9_.\"=-]{0,20}",
        proptest::bool::weighted(0.9),
    )
        .prop_map(|(name, sp1, sp2, value, with_eq)| {
            if with_eq {
                format!("{sp1}{name}{sp2}={sp2}{value}{sp1}")
            } else {
                format!("{sp1}{name}{sp2}")
            }
        })
}

/// A Cookie header value: pairs joined by ';' (with and without the space after it).
fn cookie_header() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (pair(), prop_oneof![Just(";"), Just("; "), Just(";;")]),
        0..8,
    )
    .prop_map(|v| v.into_iter().map(|(p, sep)| p + sep).collect::<String>())
}

/// A signed value with one change: a byte replaced, inserted or removed, or the case of a
/// character flipped.
fn mutated(signed: &str, at: usize, byte: u8, how: u8) -> String {
    let mut b = signed.as_bytes().to_vec();
    let at = at % (b.len() + 1);
    match how % 4 {
        0 if at < b.len() => b[at] = byte,
        1 => b.insert(at, byte),
        2 if at < b.len() => {
            b.remove(at);
        }
        _ if at < b.len() => {
            b[at] = if b[at].is_ascii_lowercase() {
                b[at].to_ascii_uppercase()
            } else {
                b[at].to_ascii_lowercase()
            }
        }
        _ => b.push(byte),
    }
    String::from_utf8_lossy(&b).into_owned()
}

proptest! {
    #![proptest_config(super::settings(4096))]

    #[test]
    fn verify_takes_any_text(key in any::<[u8; 32]>(), port in any::<u16>(), v in cookie_text()) {
        let k = CookieKey::from_bytes(key);
        if let Some(label) = k.verify(port, &v) {
            // Only what we signed verifies, and then it is exactly the signed value.
            prop_assert_eq!(k.sign(port, label), v);
        }
    }

    #[test]
    fn signed_values_verify_and_name_their_label(
        key in any::<[u8; 32]>(),
        port in any::<u16>(),
        label in label(),
    ) {
        let k = CookieKey::from_bytes(key);
        let v = k.sign(port, &label);
        prop_assert_eq!(k.verify(port, &v), Some(label.as_str()));
        // The value must travel in a Set-Cookie and come back through find() intact.
        let sc = set_cookie(&v, true);
        prop_assert!(http::HeaderValue::from_str(&sc).is_ok(), "{:?}", sc);
        let first = sc.split(';').next().unwrap_or_default();
        prop_assert_eq!(find(std::iter::once(first)), vec![v.as_str()]);
    }

    #[test]
    fn a_changed_signed_value_never_verifies(
        key in any::<[u8; 32]>(),
        port in any::<u16>(),
        other_port in any::<u16>(),
        label in label(),
        at in any::<usize>(),
        byte in prop_oneof![any::<u8>(), Just(b'+'), Just(b'.'), Just(b'0'), Just(b'A')],
        how in any::<u8>(),
    ) {
        let k = CookieKey::from_bytes(key);
        let v = k.sign(port, &label);
        let m = mutated(&v, at, byte, how);
        if m != v {
            prop_assert_eq!(k.verify(port, &m), None, "{:?} from {:?}", m, v);
        }
        if other_port != port {
            prop_assert_eq!(k.verify(other_port, &v), None);
        }
    }

    #[test]
    fn find_and_strip_take_any_text(h in cookie_text()) {
        let found = find(std::iter::once(h.as_str()));
        for v in &found {
            prop_assert!(h.contains(v));
        }
        check_strip(&h)?;
    }

    #[test]
    fn strip_drops_only_the_balancers_cookie(h in cookie_header()) {
        check_strip(&h)?;
        // Every NB_SRVID pair is found.
        let ours = h
            .split(';')
            .filter(|c| c.trim().split_once('=').is_some_and(|(n, _)| n.trim() == COOKIE_NAME))
            .count();
        prop_assert_eq!(find(std::iter::once(h.as_str())).len(), ours);
    }
}

/// `strip(h)` keeps every non-empty piece of `h` that is not an `NB_SRVID` pair, in order,
/// and nothing else: no `NB_SRVID` pair survives, and stripping again changes nothing.
fn check_strip(h: &str) -> Result<(), TestCaseError> {
    let is_ours = |c: &str| {
        c.split_once('=')
            .is_some_and(|(n, _)| n.trim() == COOKIE_NAME)
    };
    let want: Vec<&str> = h
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !is_ours(c))
        .collect();
    let got = strip(h);
    match &got {
        None => prop_assert!(want.is_empty(), "{:?} dropped {:?}", h, want),
        Some(s) => {
            let pieces: Vec<&str> = s.split(';').map(str::trim).collect();
            prop_assert_eq!(&pieces, &want, "{:?}", h);
            prop_assert!(find(std::iter::once(s.as_str())).is_empty(), "{:?}", s);
            let again = strip(s);
            prop_assert_eq!(again.as_ref(), Some(s));
        }
    }
    Ok(())
}

/// Found by `a_changed_signed_value_never_verifies`: a tag digit in upper case verified, a
/// second spelling of the same cookie.
#[test]
fn regression_upper_case_tag_does_not_verify() {
    let k = CookieKey::from_bytes([7; 32]);
    let v = k.sign(80, "web1");
    let (label, tag) = v.rsplit_once('.').unwrap();
    let upper = format!("{label}.{}", tag.to_ascii_uppercase());
    assert_ne!(upper, v, "the tag has a letter");
    assert_eq!(k.verify(80, &upper), None);
}

/// A '+' in place of a tag byte's leading zero ("0f" as "+f") verified too.
#[test]
fn regression_plus_sign_in_tag_does_not_verify() {
    let k = CookieKey::from_bytes([7; 32]);
    let (v, at) = (0..)
        .map(|i| k.sign(80, &format!("web{i}")))
        .find_map(|v| {
            let tag = v.rsplit_once('.').unwrap().1;
            let at = (0..tag.len())
                .step_by(2)
                .find(|&i| tag.as_bytes()[i] == b'0')?;
            Some((v.clone(), v.len() - tag.len() + at))
        })
        .unwrap();
    let mut plus = v.clone().into_bytes();
    plus[at] = b'+';
    let plus = String::from_utf8(plus).unwrap();
    assert_eq!(k.verify(80, &plus), None, "{plus} from {v}");
}
