//! Zero-downtime upgrade (README "Upgrading without dropping a connection"): `nb-agent run
//! --upgrade` takes the running agent's listening sockets over a unix socket in `state_dir`
//! (SCM_RIGHTS, as HAProxy's `-x` and Envoy's hot restart do), and its health and flow sync
//! socket, starts on them, and tells the old agent, which then stops accepting (it closes
//! only its own descriptors: the sockets, and the connections queued on them, live on in the
//! new agent) and finishes its requests in flight. The XDP program and its maps are pinned
//! and adopted as on any restart. No connect is refused: a socket is never closed or
//! re-bound, only its accepting process changes.
//!
//! The exchange, on `state_dir/upgrade.sock` (0600, root's):
//! 1. new -> old: `nb-upgrade 1\n`;
//! 2. old -> new: one JSON line (the manifest: which sockets, in order, and every node's
//!    health) carrying the descriptors;
//! 3. new -> old: `ready\n` once it serves (or the connection closes: the new agent failed,
//!    and the old one goes on as before).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use thiserror::Error;

const HELLO: &str = "nb-upgrade 1\n";
/// The most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;
/// How long either side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the handover, each saying which side and step.
#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("upgrade socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the running agent's answer: {0}")]
    Protocol(String),
    #[error("{0} listening sockets: more than one message carries ({MAX_FDS})")]
    TooMany(usize),
}

/// Where the running agent listens for an upgrade.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade.sock")
}

/// What the old agent hands over.
pub struct Handover {
    pub admin: Option<TcpListener>,
    /// Each address's socket group, one per worker.
    pub groups: Vec<(SocketAddr, Vec<TcpListener>)>,
    pub sync: Option<UdpSocket>,
    /// Every node's health as "PORT_KEY\tLABEL" -> "up" / "down".
    pub health: HashMap<String, String>,
}

/// The running agent's side: listens on `state_dir/upgrade.sock`.
pub fn listen(state_dir: &Path) -> Result<UnixListener, UpgradeError> {
    let path = socket_path(state_dir);
    let err = |source| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(err)?;
    // A socket file an earlier agent left: nobody listens on it any more.
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// The running agent's side of one exchange, steps 1 and 2: reads the hello on `conn` and
/// sends `h`. The caller then waits for [`wait_ready`] on the same connection.
pub fn send(conn: &UnixStream, h: &Handover) -> Result<(), UpgradeError> {
    let path = PathBuf::from("upgrade.sock");
    let err = |source| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    conn.set_nonblocking(false).map_err(err)?;
    conn.set_read_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).map_err(err)?;
    if line != HELLO {
        return Err(UpgradeError::Protocol(format!("unexpected hello {line:?}")));
    }
    let mut fds: Vec<RawFd> = Vec::new();
    if let Some(a) = &h.admin {
        fds.push(a.as_raw_fd());
    }
    let mut groups = Vec::new();
    for (addr, g) in &h.groups {
        groups.push(json!({ "addr": addr.to_string(), "count": g.len() }));
        fds.extend(g.iter().map(|s| s.as_raw_fd()));
    }
    if let Some(s) = &h.sync {
        fds.push(s.as_raw_fd());
    }
    if fds.len() > MAX_FDS {
        return Err(UpgradeError::TooMany(fds.len()));
    }
    let manifest = json!({
        "admin": h.admin.is_some(),
        "groups": groups,
        "sync": h.sync.is_some(),
        "health": h.health,
    })
    .to_string()
        + "\n";
    send_with_fds(conn, manifest.as_bytes(), &fds).map_err(err)
}

/// Step 3 on the old side: whether the new agent said it serves (false: it closed the
/// connection or said nothing in time).
pub fn wait_ready(conn: &UnixStream) -> bool {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).is_ok() && line == "ready\n"
}

/// The new agent's side, steps 1 and 2: asks the agent running with `state_dir` for its
/// sockets. Returns them with the connection to say `ready` on ([`ready`]).
pub fn receive(state_dir: &Path) -> Result<(Handover, UnixStream), UpgradeError> {
    let path = socket_path(state_dir);
    let err = |source| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    let mut conn = UnixStream::connect(&path).map_err(err)?;
    conn.set_read_timeout(Some(STEP_TIMEOUT)).map_err(err)?;
    conn.write_all(HELLO.as_bytes()).map_err(err)?;
    let (bytes, fds) = recv_with_fds(&conn).map_err(err)?;
    let text = String::from_utf8_lossy(&bytes);
    let m: Value = serde_json::from_str(text.trim())
        .map_err(|e| UpgradeError::Protocol(format!("manifest {text:?}: {e}")))?;
    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or_else(|| UpgradeError::Protocol("fewer descriptors than the manifest".into()))
    };
    let admin = if m["admin"].as_bool() == Some(true) {
        Some(TcpListener::from(next()?))
    } else {
        None
    };
    let mut groups = Vec::new();
    for g in m["groups"].as_array().cloned().unwrap_or_default() {
        let addr: SocketAddr = g["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| UpgradeError::Protocol(format!("bad group {g}")))?;
        let n = g["count"].as_u64().unwrap_or(0);
        let mut socks = Vec::new();
        for _ in 0..n {
            socks.push(TcpListener::from(next()?));
        }
        groups.push((addr, socks));
    }
    let sync = if m["sync"].as_bool() == Some(true) {
        Some(UdpSocket::from(next()?))
    } else {
        None
    };
    let health = m["health"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        Handover {
            admin,
            groups,
            sync,
            health,
        },
        conn,
    ))
}

/// Step 3 on the new side.
pub fn ready(mut conn: UnixStream) {
    let _ = conn.write_all(b"ready\n");
}

fn send_with_fds(conn: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let space = cmsg_space(fds.len());
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below points at live buffers
    // of the lengths given, which outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is `CMSG_SPACE` of the descriptors, so the first header
        // and its data (the descriptors, copied in) fit in it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
    }
    // SAFETY: `msg` is fully set up as above; the socket is ours.
    let n = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (n as usize) < data.len() {
        // The descriptors went with the first bytes; the rest is plain data.
        (&*conn).write_all(&data[n as usize..])?;
    }
    Ok(())
}

fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n.max(1) * size_of::<RawFd>()) as u32) as usize }
}

/// Reads one line with the descriptors that came with it.
fn recv_with_fds(conn: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let space = cmsg_space(MAX_FDS);
    let mut control = vec![0u8; space];
    while !data.ends_with(b"\n") {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: as in `send_with_fds`; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at live buffers; MSG_CMSG_CLOEXEC marks the descriptors.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the running agent closed the upgrade socket",
            ));
        }
        data.extend_from_slice(&buf[..n as usize]);
        // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros walk
        // only within it, and each SCM_RIGHTS descriptor is a new one owned here.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c) as *const RawFd;
                    for i in 0..len / size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_health_cross_to_the_new_agent() {
        let dir = std::env::temp_dir().join(format!("nb-upgrade-{}", std::process::id()));
        let l = listen(&dir).unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let g1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let g1_addr = g1.local_addr().unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let admin_addr = a.local_addr().unwrap();
        let old = std::thread::spawn(move || {
            let conn = loop {
                match l.accept() {
                    Ok((c, _)) => break c,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            let h = Handover {
                admin: Some(a),
                groups: vec![(g1_addr, vec![g1])],
                sync: Some(udp),
                health: HashMap::from([("80/tcp\tb1".to_string(), "down".to_string())]),
            };
            send(&conn, &h).unwrap();
            wait_ready(&conn)
        });
        let (h, conn) = receive(&dir).unwrap();
        assert_eq!(h.admin.as_ref().unwrap().local_addr().unwrap(), admin_addr);
        assert_eq!(h.groups[0].0, g1_addr);
        assert_eq!(h.groups[0].1[0].local_addr().unwrap(), g1_addr);
        assert_eq!(h.sync.as_ref().unwrap().local_addr().unwrap(), udp_addr);
        assert_eq!(h.health["80/tcp\tb1"], "down");
        // The socket handed over is the same socket: a connection to it is accepted here.
        let _c = std::net::TcpStream::connect(g1_addr).unwrap();
        h.groups[0].1[0].accept().unwrap();
        ready(conn);
        assert!(old.join().unwrap(), "the old side heard ready");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
