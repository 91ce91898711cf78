//! Socket activation, the way systemd does it (`sd_listen_fds(3)`): a
//! service manager that bound the listening socket itself passes it as file
//! descriptor 3 and says so in `LISTEN_FDS` (how many were passed) and
//! `LISTEN_PID` (the process they are meant for). The gateway then serves
//! on that socket instead of binding `server.listen`: the port may be
//! privileged while the process is not, connections wait in the socket's
//! backlog while the process restarts, and whoever starts the binary (a
//! test, too) holds the port from the start, with no window in which
//! another process could take it.
//!
//! This module only adopts a socket that was passed; it never binds one.
//! It takes the variables out of the environment so that a process the
//! gateway might start could not mistake them for its own.

use std::net::TcpListener;

/// The variables of the protocol (`LISTEN_FDNAMES` only names the sockets).
const VARIABLES: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// Where the gateway's listener comes from.
#[derive(Debug)]
pub enum Listener {
    /// Nothing was passed: bind `server.listen`.
    Bind,
    /// `LISTEN_FDS` is meant for another process (`LISTEN_PID`): ignored,
    /// as `sd_listen_fds` ignores it; bind `server.listen`.
    OtherProcess(u32),
    /// The listening socket passed as file descriptor 3, non-blocking and
    /// closed on exec.
    Inherited(TcpListener),
}

/// Why a passed socket cannot be served. The gateway refuses to start
/// rather than bind `server.listen` behind the service manager's back.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number of file descriptors")]
    BadCount(String),
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    #[error(
        "{0} sockets were passed (LISTEN_FDS={0}); the gateway serves one \
         (give the socket unit a single ListenStream=)"
    )]
    TooMany(u32),
    #[error("file descriptor 3 (passed with LISTEN_FDS=1) is not a listening TCP socket: {0}")]
    NotATcpListener(String),
}

/// What the variables say was passed to this process.
#[derive(Debug, PartialEq, Eq)]
enum Passed {
    Nothing,
    OtherProcess(u32),
    One,
}

/// Reads the protocol's variables as `sd_listen_fds` does: `LISTEN_PID`,
/// when set, must be this process (`own_pid`); `LISTEN_FDS` counts the
/// descriptors from 3 on.
fn passed(fds: Option<&str>, pid: Option<&str>, own_pid: u32) -> Result<Passed, ActivationError> {
    let Some(fds) = fds else {
        return Ok(Passed::Nothing);
    };
    if let Some(pid) = pid {
        let pid: u32 = pid
            .parse()
            .map_err(|_| ActivationError::BadPid(pid.to_owned()))?;
        if pid != own_pid {
            return Ok(Passed::OtherProcess(pid));
        }
    }
    match fds.parse::<u32>() {
        Ok(0) => Ok(Passed::Nothing),
        Ok(1) => Ok(Passed::One),
        Ok(n) => Err(ActivationError::TooMany(n)),
        Err(_) => Err(ActivationError::BadCount(fds.to_owned())),
    }
}

/// Takes the socket the service manager passed, if any, and removes the
/// protocol's variables from the environment.
///
/// # Safety
///
/// No other thread may be running (it changes the environment), and
/// nothing in the process may own file descriptor 3 yet: call it first
/// thing in `main`'s thread, before opening a file or starting a runtime.
pub unsafe fn take() -> Result<Listener, ActivationError> {
    let read = |name: &str| {
        std::env::var_os(name).map(|v| v.to_str().map_or_else(|| format!("{v:?}"), str::to_owned))
    };
    let fds = read("LISTEN_FDS");
    let pid = read("LISTEN_PID");
    for name in VARIABLES {
        // SAFETY: the caller guarantees that no other thread runs, so none
        // reads the environment meanwhile.
        unsafe { std::env::remove_var(name) };
    }
    match passed(fds.as_deref(), pid.as_deref(), std::process::id())? {
        Passed::Nothing => Ok(Listener::Bind),
        Passed::OtherProcess(pid) => Ok(Listener::OtherProcess(pid)),
        // SAFETY: the caller guarantees that nothing owns descriptor 3.
        Passed::One => unsafe { adopt() }.map(Listener::Inherited),
    }
}

/// Takes ownership of descriptor 3 once it is known to be a listening TCP
/// socket.
///
/// # Safety
///
/// Nothing else in the process may own descriptor 3.
#[cfg(unix)]
unsafe fn adopt() -> Result<TcpListener, ActivationError> {
    use std::os::fd::FromRawFd;

    use socket2::{Socket, Type};

    const FD: std::os::fd::RawFd = 3;
    let invalid = |e: std::io::Error| ActivationError::NotATcpListener(e.to_string());
    // Owning a descriptor that is not open is undefined behaviour: ask
    // first (F_GETFD only reads the descriptor's flags).
    // SAFETY: fcntl with F_GETFD takes no pointer and changes nothing.
    if unsafe { libc::fcntl(FD, libc::F_GETFD) } == -1 {
        return Err(invalid(std::io::Error::last_os_error()));
    }
    // SAFETY: descriptor 3 is open (checked above) and, as the caller
    // guarantees, owned by nothing else. Should it turn out not to be a
    // listening socket, dropping `socket` closes it, and the gateway exits.
    let socket = unsafe { Socket::from_raw_fd(FD) };
    if socket.r#type().map_err(invalid)? != Type::STREAM {
        return Err(ActivationError::NotATcpListener(
            "not a stream socket".into(),
        ));
    }
    if socket.local_addr().map_err(invalid)?.as_socket().is_none() {
        return Err(ActivationError::NotATcpListener(
            "not an IPv4 or IPv6 socket (the gateway serves TCP, not a Unix socket)".into(),
        ));
    }
    // A stream socket that was never listened on would fail every accept.
    #[cfg(target_os = "linux")]
    if !socket.is_listener().map_err(invalid)? {
        return Err(ActivationError::NotATcpListener(
            "bound but not listening".into(),
        ));
    }
    socket.set_cloexec(true).map_err(invalid)?;
    socket.set_nonblocking(true).map_err(invalid)?;
    Ok(TcpListener::from(socket))
}

#[cfg(not(unix))]
unsafe fn adopt() -> Result<TcpListener, ActivationError> {
    Err(ActivationError::NotATcpListener(
        "socket activation needs a Unix system".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_variables_as_sd_listen_fds_does() {
        use Passed::*;
        let own = 4242;
        for (fds, pid, expected) in [
            (None, None, Nothing),
            (None, Some("4242"), Nothing),
            (Some("0"), None, Nothing),
            (Some("1"), None, One),
            (Some("1"), Some("4242"), One),
            (Some("1"), Some("77"), OtherProcess(77)),
            // Meant for another process: not ours to judge.
            (Some("x"), Some("77"), OtherProcess(77)),
            (Some("3"), Some("77"), OtherProcess(77)),
        ] {
            assert_eq!(passed(fds, pid, own).unwrap(), expected, "{fds:?} {pid:?}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_serve() {
        let own = 4242;
        for (fds, pid, expected) in [
            ("2", None, "2 sockets were passed"),
            ("", None, "LISTEN_FDS=\"\" is not a number"),
            ("-1", None, "LISTEN_FDS=\"-1\" is not a number"),
            ("one", None, "LISTEN_FDS=\"one\" is not a number"),
            ("1", Some("me"), "LISTEN_PID=\"me\" is not a process id"),
            ("1", Some(""), "LISTEN_PID=\"\" is not a process id"),
        ] {
            let error = passed(Some(fds), pid, own).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{fds:?} {pid:?}: {error}");
        }
    }
}
