//! Which network addresses an outgoing request (a webhook) may reach: not the machine
//! itself, its private networks, link-local addresses (where cloud metadata services
//! answer, 169.254.169.254), or other special ranges, unless an endpoint's config allows
//! them. A webhook URL is operator config, but a trigger's delivery is the kind of
//! request an attacker who can change that config, or a DNS name in it, would aim inside.
//!
//! The check sits in the HTTP client's resolver ([`GuardedResolver`]): the client
//! connects only to addresses the resolver returned, so the address checked is the address
//! connected to, and a DNS name that resolves to a public address once and to 127.0.0.1
//! the next time (DNS rebinding) is refused the second time. IP-literal URLs skip
//! resolution, so [`check_url`] refuses those when the config is read.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Why `ip` is internal, or `None` for a public unicast address.
pub fn internal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local (cloud metadata services answer here)",
        _ if a == 0 => "this network (0.0.0.0/8)",
        _ if a == 100 && (b & 0xc0) == 64 => "shared address space (100.64.0.0/10)",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol assignments (192.0.0.0/24)",
        _ if a == 198 && (b & 0xfe) == 18 => "benchmarking (198.18.0.0/15)",
        _ if ip.is_multicast() => "multicast",
        _ if a >= 240 => "reserved (240.0.0.0/4, broadcast)",
        _ if ip.is_documentation() => "documentation",
        _ => return None,
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    // An IPv4 address inside IPv6 is judged as that IPv4 address: ::ffff:127.0.0.1 is
    // loopback however it is spelled.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    Some(match segments {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        // Deprecated IPv4-compatible addresses (::a.b.c.d).
        [0, 0, 0, 0, 0, 0, hi, lo] => {
            return internal_v4(embedded(hi, lo)).or(Some("IPv4-compatible"))
        }
        // NAT64 (64:ff9b::/96) reaches the IPv4 address it embeds.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => return internal_v4(embedded(hi, lo)),
        // 6to4 (2002::/16) embeds an IPv4 address in its second and third segments.
        [0x2002, hi, lo, ..] => return internal_v4(embedded(hi, lo)),
        [s, ..] if (s & 0xfe00) == 0xfc00 => "unique local (fc00::/7)",
        [s, ..] if (s & 0xffc0) == 0xfe80 => "link-local",
        [s, ..] if (s & 0xffc0) == 0xfec0 => "site-local",
        [s, ..] if (s & 0xff00) == 0xff00 => "multicast",
        [0x2001, 0xdb8, ..] => "documentation",
        _ => return None,
    })
}

/// Refuses a URL whose host is an internal IP literal, unless `allow_internal`.
pub fn check_url(url: &str, allow_internal: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    // The URL parser has already turned every IPv4 spelling (0x7f000001, 2130706433)
    // into dotted decimal, and IPv6 hosts come in brackets.
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("url {url:?} has no host"))?;
    let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Ok(());
    };
    match internal(ip) {
        Some(why) if !allow_internal => Err(refusal(&ip.to_string(), ip, why)),
        _ => Ok(()),
    }
}

fn refusal(host: &str, ip: IpAddr, why: &str) -> String {
    format!(
        "{host} is {ip}, a {why} address, which webhooks may not reach unless the endpoint \
         sets allow_internal_addresses = true"
    )
}

/// A DNS resolver for the webhook client that drops internal addresses (see the module
/// note), unless `allow_internal`.
pub struct GuardedResolver {
    pub allow_internal: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_internal;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match internal(a.ip()) {
                    Some(why) if !allow => {
                        refused.get_or_insert_with(|| refusal(&host, a.ip(), why));
                        false
                    }
                    _ => true,
                })
                .collect();
            if usable.is_empty() {
                let message = refused.unwrap_or_else(|| format!("{host} resolves to no address"));
                return Err(message.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(usable.into_iter());
            Ok(addrs)
        })
    }
}

impl GuardedResolver {
    pub fn shared(allow_internal: bool) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { allow_internal })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_named_in_every_spelling() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert!(internal(parsed).is_some(), "{ip} must be internal");
        }
        for ip in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(internal(parsed), None, "{ip} is public");
        }
    }

    #[test]
    fn internal_ip_literal_urls_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/hook",
            "http://10.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://[::ffff:127.0.0.1]/",
            "http://0x7f000001/",
            "http://2130706433/",
        ] {
            let e = check_url(url, false).expect_err(url);
            assert!(e.contains("allow_internal_addresses"), "{e}");
            assert!(check_url(url, true).is_ok(), "{url}");
        }
        assert!(check_url("https://hooks.example.com/x", false).is_ok());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        use reqwest::dns::Resolve as _;
        let name = || "localhost".parse::<reqwest::dns::Name>().unwrap();
        let e = match GuardedResolver::shared(false).resolve(name()).await {
            Err(e) => e.to_string(),
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
        };
        assert!(
            e.contains("loopback") && e.contains("allow_internal_addresses"),
            "{e}"
        );
        let addrs: Vec<_> = GuardedResolver::shared(true)
            .resolve(name())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
