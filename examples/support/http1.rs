//! HTTP/1.1 by hand for the load tools (`loadgen`, `soak`): one request
//! written in one piece, the answer's head parsed for status and length.
//! The generators must stay cheaper than the server they measure.

/// Sends one request and reads its whole response; the status, or `None`
/// when the connection failed or the answer was not HTTP/1.1.
pub async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut [u8],
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request).await.ok()?;
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await.ok()?;
        if n == 0 {
            return None;
        }
        filled += n;
        let Some(head_end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            if filled == buf.len() {
                return None;
            }
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end]).ok()?;
        let status: u16 = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
        let length: usize = head
            .split("\r\n")
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        let total = head_end + 4 + length;
        if total > buf.len() {
            return None;
        }
        while filled < total {
            let n = stream.read(&mut buf[filled..]).await.ok()?;
            if n == 0 {
                return None;
            }
            filled += n;
        }
        return Some(status);
    }
}
