//! `IpCidr`: an IP network in CIDR notation (`10.232.0.1/24`), parsed strictly, for overlay
//! addresses, allowed IPs and routes.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address with a prefix length. The address may have host bits set (an interface address
/// such as `10.232.0.1/24`); [`IpCidr::network`] clears them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpCidr {
    address: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not an IP network in CIDR notation (ADDRESS/PREFIX): {reason}")]
pub struct CidrParseError {
    pub value: String,
    pub reason: &'static str,
}

impl IpCidr {
    /// `None` when the prefix is longer than the address family allows.
    pub fn new(address: IpAddr, prefix_len: u8) -> Option<Self> {
        (prefix_len <= max_prefix_len(address)).then_some(Self {
            address,
            prefix_len,
        })
    }

    /// A single host: `/32` for IPv4, `/128` for IPv6.
    pub fn host(address: IpAddr) -> Self {
        Self {
            address,
            prefix_len: max_prefix_len(address),
        }
    }

    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The same prefix with the host bits cleared (`10.232.0.1/24` → `10.232.0.0/24`).
    pub fn network(&self) -> Self {
        let address = match self.address {
            IpAddr::V4(v4) => {
                let mask = prefix_mask_u32(self.prefix_len);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = prefix_mask_u128(self.prefix_len);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        };
        Self {
            address,
            prefix_len: self.prefix_len,
        }
    }

    /// Whether `other` lies entirely inside this network (same family, longer or equal prefix).
    pub fn contains(&self, other: &IpCidr) -> bool {
        if other.prefix_len < self.prefix_len {
            return false;
        }
        match (self.network().address, other.address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                u32::from(addr) & prefix_mask_u32(self.prefix_len) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                u128::from(addr) & prefix_mask_u128(self.prefix_len) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn max_prefix_len(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn prefix_mask_u32(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0)
}

fn prefix_mask_u128(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len))
        .unwrap_or(0)
}

impl fmt::Display for IpCidr {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.address, self.prefix_len)
    }
}

impl FromStr for IpCidr {
    type Err = CidrParseError;

    /// Strict: `ADDRESS/PREFIX`, no spaces, prefix without leading `+`. A bare address is an
    /// error (say `/32` explicitly) so a typo never widens or narrows a network silently.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| CidrParseError {
            value: text.chars().take(64).collect(),
            reason,
        };
        let (address_text, prefix_text) =
            text.split_once('/').ok_or_else(|| error("no /PREFIX"))?;
        let address: IpAddr = address_text
            .parse()
            .map_err(|_| error("the address is not an IPv4 or IPv6 address"))?;
        if prefix_text.is_empty()
            || prefix_text.len() > 3
            || !prefix_text.bytes().all(|byte| byte.is_ascii_digit())
        {
            return Err(error("the prefix is not a number"));
        }
        let prefix_len: u8 = prefix_text
            .parse()
            .map_err(|_| error("the prefix is not a number"))?;
        IpCidr::new(address, prefix_len)
            .ok_or_else(|| error("the prefix is too long for the address family"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_v4_and_v6() {
        let v4: IpCidr = "10.232.0.1/24".parse().unwrap();
        assert_eq!(v4.to_string(), "10.232.0.1/24");
        assert_eq!(v4.network().to_string(), "10.232.0.0/24");
        let v6: IpCidr = "fd00:1::5/64".parse().unwrap();
        assert_eq!(v6.network().to_string(), "fd00:1::/64");
        assert_eq!(
            IpCidr::host("10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1/32"
        );
    }

    #[test]
    fn rejects_bad_text_with_the_value() {
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "10.0.0.1/",
            "x/24",
            "10.0.0.1/+4",
            "::/129",
            "1.2.3.4/ 8",
        ] {
            let error = bad.parse::<IpCidr>().unwrap_err();
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn containment() {
        let overlay: IpCidr = "10.232.0.1/24".parse().unwrap();
        assert!(overlay.contains(&"10.232.0.7/32".parse().unwrap()));
        assert!(overlay.contains(&"10.232.0.0/24".parse().unwrap()));
        assert!(!overlay.contains(&"10.232.0.0/16".parse().unwrap()));
        assert!(!overlay.contains(&"10.233.0.7/32".parse().unwrap()));
        assert!(!overlay.contains(&"::1/128".parse().unwrap()));
        let everything: IpCidr = "0.0.0.0/0".parse().unwrap();
        assert!(everything.contains(&"192.168.1.1/32".parse().unwrap()));
    }
}
