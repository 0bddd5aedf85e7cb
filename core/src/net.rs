//! Network address rules shared by the processes that call out (webhook deliveries) and the
//! API that registers their destinations: an outbound request must never reach the platform's
//! own network (SSRF), so only public unicast addresses are allowed.

use std::net::{IpAddr, Ipv4Addr};

/// Why an address may not receive webhooks, or `None` when it is a public unicast address.
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => {
            // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) reach an IPv4 host.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refusal_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return refusal_v4(Ipv4Addr::new(a, b, c, d));
            }
            // The local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215): an operator's own translator,
            // which may embed the IPv4 host anywhere (RFC 6052 lets a /48 carry it split around
            // the u octet), so nothing behind it is known to be public.
            if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 {
                return Some("local-use NAT64");
            }
            // 6to4 (2002:a.b.c.d::/16) embeds an IPv4 host too; Teredo (2001::/32), the
            // documentation prefix (2001:db8::/32) and discard-only (100::/64) are never a
            // public destination (IANA's special-purpose registry).
            if s[0] == 0x2002 {
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return refusal_v4(Ipv4Addr::new(a, b, c, d)).or(Some("6to4"));
            }
            if (s[0] == 0x2001 && (s[1] == 0 || s[1] == 0x0db8)) || s[..4] == [0x0100, 0, 0, 0] {
                return Some("reserved");
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if v6.segments()[..6] == [0, 0, 0, 0, 0, 0] {
                // IPv4-compatible (::a.b.c.d), deprecated and never a real public destination.
                Some("reserved")
            } else {
                None
            }
        }
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("multicast or reserved")
    } else if (a == 192 && b == 0 && matches!(c, 0 | 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
    {
        // IETF protocol assignments, benchmarking and the documentation networks (RFC 6890).
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_use_nat64_prefix_is_refused_and_the_well_known_one_by_its_ipv4_host() {
        for ip in ["64:ff9b:1::a9fe:a9fe", "64:ff9b:1::808:808", "64:ff9b:1:ffff:ffff:ffff:ffff:ffff"] {
            assert_eq!(refusal(ip.parse().expect("ip")), Some("local-use NAT64"), "{ip}");
        }
        assert_eq!(refusal("64:ff9b::a9fe:a9fe".parse().expect("ip")), Some("link-local"));
        assert_eq!(refusal("64:ff9b::808:808".parse().expect("ip")), None, "8.8.8.8 through the well-known prefix");
    }
}
