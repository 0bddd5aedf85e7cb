//! The client's address: the TCP peer, or — when the peer is a reverse proxy named in
//! `TRUSTED_PROXIES` — the address that proxy says it serves, from `X-Forwarded-For`.
//!
//! Behind a proxy every request's peer is the proxy, so per-IP rate limits, the cap on
//! WebSockets awaiting authentication, the audit trail's IPs and the new-sign-in emails would all
//! see one address. Believing `X-Forwarded-For` from anyone would let each client pick its own.
//! So the header is read only from a trusted peer, from the right (the entries the proxies
//! appended) to the left, skipping trusted proxies: the first address that is not one is the
//! client. Entries left of it were written by the client itself and are never believed. An entry
//! that is not an address ends the walk at the last address read (a proxy we trust would not
//! write one). Middleware ([`resolve`], installed only when `TRUSTED_PROXIES` names a proxy)
//! stores the result as a [`ClientIp`] extension; handlers and the rate limiter read it with
//! [`client_ip`], which without it is the peer.
//!
//! Per-client limits count by [`limit_key`]: an IPv6 client by its /64, the block a subscriber
//! or a host is given, in which it picks addresses at will (counted per address, one /64 could
//! hold every place of the WebSocket cap and a bucket per address).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use vault_core::config::TrustedProxies;

/// The client's address as [`resolve`] decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// Middleware: decides the request's [`ClientIp`].
pub async fn resolve(State(trusted): State<Arc<TrustedProxies>>, mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let ip = client_of(peer.ip(), req.headers(), &trusted);
        req.extensions_mut().insert(ClientIp(ip));
    }
    next.run(req).await
}

/// What per-client limits count `ip` under: an IPv6 address by its /64 network, an IPv4 one (or
/// one IPv4-mapped in IPv6) by itself.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// The request's client address: its [`ClientIp`], else its TCP peer's.
pub fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    extensions
        .get::<ClientIp>()
        .map(|ClientIp(ip)| *ip)
        .or_else(|| extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip().to_canonical()))
}

/// See the module documentation.
pub fn client_of(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(&client) {
        return client;
    }
    // Every X-Forwarded-For line, in order, as one list of entries, split as bytes: an entry
    // that is not text (a client may send any byte, and proxies pass it on) is one entry that
    // is not an address, where it stands — not a reason to drop the proxies' entries right of it.
    let mut hops: Vec<&[u8]> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        hops.extend(value.as_bytes().split(|b| *b == b','));
    }
    for hop in hops.iter().rev() {
        let Some(ip) = std::str::from_utf8(hop).ok().and_then(parse_hop) else { return client };
        client = ip;
        if !trusted.contains(&ip) {
            break;
        }
    }
    client
}

/// One entry: an address, or an address with a port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>().or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip())).ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_an_ipv6_client_by_its_slash_64_and_an_ipv4_one_by_its_address() {
        let key = |s: &str| limit_key(s.parse().expect("an address"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(key("2001:db8:1:2:aaaa::1").to_string(), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"), "another /64 is another client");
        assert_eq!(key("::ffff:203.0.113.7").to_string(), "203.0.113.7");
        assert_ne!(key("203.0.113.7"), key("203.0.113.8"));
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append("x-forwarded-for", line.parse().expect("header value"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn proxies(s: &str) -> TrustedProxies {
        s.parse().expect("proxies")
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let h = headers(&["203.0.113.7"]);
        assert_eq!(client_of(ip("10.0.0.2"), &h, &TrustedProxies::default()), ip("10.0.0.2"));
        // A peer that is not a proxy we trust cannot name another client.
        assert_eq!(client_of(ip("198.51.100.9"), &h, &proxies("10.0.0.0/8")), ip("198.51.100.9"));
    }

    #[test]
    fn the_rightmost_address_that_is_not_a_trusted_proxy_is_the_client() {
        let trusted = proxies("10.0.0.0/8, 192.168.1.7");
        // The client wrote the first entry itself: never believed.
        let h = headers(&["1.1.1.1, 203.0.113.7, 10.0.0.5"]);
        assert_eq!(client_of(ip("192.168.1.7"), &h, &trusted), ip("203.0.113.7"));
        // Two header lines are one list, in order.
        let h = headers(&["1.1.1.1", "203.0.113.8"]);
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.8"));
        // Ports and IPv6 are read; an IPv4 peer mapped into IPv6 is itself.
        let h = headers(&["[2001:db8::1]:443"]);
        assert_eq!(client_of(ip("::ffff:10.0.0.2"), &h, &trusted), ip("2001:db8::1"));
        let h = headers(&["203.0.113.9:5678"]);
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn an_entry_that_is_not_an_address_ends_the_walk_at_the_last_address_read() {
        let trusted = proxies("10.0.0.0/8");
        let h = headers(&["203.0.113.7, unknown, 10.0.0.5"]);
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.5"));
        // Bytes that are not text are an entry that is not an address, where they stand.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"\xff, 198.51.100.23").expect("value"));
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.23"));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"198.51.100.23, \xff").expect("value"));
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
        // No header: the proxy itself.
        assert_eq!(client_of(ip("10.0.0.2"), &HeaderMap::new(), &trusted), ip("10.0.0.2"));
        // Only trusted hops: the leftmost of them.
        let h = headers(&["10.0.0.9, 10.0.0.5"]);
        assert_eq!(client_of(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.9"));
    }

    #[test]
    fn trusted_proxies_parse_addresses_and_blocks_and_refuse_anything_else() {
        let t = proxies("10.0.0.0/8,192.168.1.7, 2001:db8::/32");
        assert!(t.contains(&ip("10.255.0.1")) && t.contains(&ip("192.168.1.7")) && t.contains(&ip("2001:db8::5")));
        assert!(!t.contains(&ip("192.168.1.8")) && !t.contains(&ip("11.0.0.1")));
        assert_eq!(t.to_string(), "10.0.0.0/8,192.168.1.7/32,2001:db8::/32");
        for refused in ["10.0.0.0/33", "proxy.internal", "192.168.1.7/2", "0.0.0.0/0", "::/0", "10.0.0.0/8,,x"] {
            assert!(refused.parse::<TrustedProxies>().is_err(), "{refused}");
        }
    }
}
