//! The device's feature bits, its `struct virtio_net_config` (served through GET_CONFIG),
//! the virtio-net header size and the tap offloads that follow from the negotiated features.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest queue the frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Queue 0 receives (device to driver), queue 1 transmits.
pub const RX_QUEUE: usize = 0;
/// See [`RX_QUEUE`].
pub const TX_QUEUE: usize = 1;
/// Number of queues: one RX/TX pair.
pub const NUM_QUEUES: usize = 2;
/// Largest Ethernet frame carried (without the virtio-net header): a 64 KiB GSO packet plus
/// an Ethernet header with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 64 * 1024 + 18;
/// `struct virtio_net_hdr_mrg_rxbuf`: the header with VERSION_1 or MRG_RXBUF.
pub const HDR_LEN: usize = 12;
/// `struct virtio_net_hdr`: the legacy header without MRG_RXBUF.
pub const LEGACY_HDR_LEN: usize = 10;
/// Bytes of config space described: `mac`, `status`, `max_virtqueue_pairs`.
pub const CONFIG_LEN: usize = 10;

/// Guest-side offload features and the `TUN_F_*` bit each one maps to.
const GUEST_OFFLOADS: [(u32, libc::c_uint); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
];

/// Why a MAC address is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    /// Not six colon-separated hex bytes.
    #[error("MAC address {0:?} is not of the form 52:54:00:12:34:56")]
    Syntax(String),
    /// The group bit is set: not a unicast address.
    #[error("MAC address {0} is a multicast address")]
    Multicast(String),
    /// All zeroes.
    #[error("MAC address {0} is all zeroes")]
    Zero(String),
}

/// Parses `aa:bb:cc:dd:ee:ff` into a unicast, non-zero MAC address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(MacError::Syntax(s.to_string()));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(MacError::Syntax(s.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.to_string()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero(s.to_string()));
    }
    Ok(mac)
}

/// What the config space and the feature bits say about one NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address given to the guest (VIRTIO_NET_F_MAC), if any.
    pub mac: Option<[u8; 6]>,
    /// Whether the tap accepted `TUN_F_UFO` (so UFO may be offered).
    pub ufo: bool,
}

impl NetConfig {
    /// The virtio feature bits offered to the frontend (including
    /// `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn features(&self) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ];
        if self.ufo {
            bits.extend([VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_GUEST_UFO]);
        }
        if self.mac.is_some() {
            bits.push(VIRTIO_NET_F_MAC);
        }
        bits.iter()
            .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |f, b| {
                f | (1u64 << b)
            })
    }

    /// The vhost-user protocol features offered.
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    /// The config space, little-endian, [`CONFIG_LEN`] bytes: `mac` (zero without one),
    /// `status` = LINK_UP, `max_virtqueue_pairs` = 1.
    pub fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac.unwrap_or([0; 6]));
        b[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    /// `size` bytes of the config space from `offset`; bytes past its end read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let all = self.bytes();
        let mut out = vec![0u8; size as usize];
        let start = offset as usize;
        if start < all.len() {
            let n = (all.len() - start).min(out.len());
            out[..n].copy_from_slice(&all[start..start + n]);
        }
        out
    }
}

/// The virtio-net header size for the negotiated `features`: 12 bytes with VERSION_1 or
/// MRG_RXBUF, else the 10-byte legacy header.
pub fn header_len(features: u64) -> usize {
    if features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// Whether mergeable RX buffers were negotiated.
pub fn mergeable(features: u64) -> bool {
    features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
}

/// The `TUNSETOFFLOAD` argument for the negotiated `features`: what the guest said it can
/// receive. TSO/ECN/UFO without GUEST_CSUM are meaningless and left out.
pub fn tap_offloads(features: u64) -> libc::c_uint {
    if features & (1 << VIRTIO_NET_F_GUEST_CSUM) == 0 {
        return 0;
    }
    GUEST_OFFLOADS
        .iter()
        .filter(|(bit, _)| features & (1u64 << bit) != 0)
        .fold(0, |acc, (_, tun)| acc | tun)
}

/// Every `TUN_F_*` bit this device may ask for (used to probe the tap).
pub fn all_tap_offloads() -> libc::c_uint {
    GUEST_OFFLOADS.iter().fold(0, |acc, (_, tun)| acc | tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0g",
            "52:54:00:ab:cd:0:1",
            "5:54:00:ab:cd:01",
        ] {
            assert!(matches!(parse_mac(bad), Err(MacError::Syntax(_))), "{bad}");
        }
        assert!(matches!(
            parse_mac("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            parse_mac("00:00:00:00:00:00"),
            Err(MacError::Zero(_))
        ));
    }

    #[test]
    fn config_and_features() {
        let c = NetConfig {
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            ufo: false,
        };
        assert_eq!(c.bytes(), [0x52, 0x54, 0, 1, 2, 3, 1, 0, 1, 0]);
        assert_eq!(c.read(6, 4), vec![1, 0, 1, 0]);
        assert_eq!(c.read(8, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(c.read(u32::MAX, 2), vec![0, 0]);
        let f = c.features();
        assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
        assert_eq!(f & (1 << VIRTIO_NET_F_HOST_UFO), 0);
        let no_mac = NetConfig {
            mac: None,
            ufo: true,
        };
        assert_eq!(no_mac.features() & (1 << VIRTIO_NET_F_MAC), 0);
        assert_ne!(no_mac.features() & (1 << VIRTIO_NET_F_GUEST_UFO), 0);
        assert_eq!(header_len(1 << VIRTIO_F_VERSION_1), 12);
        assert_eq!(header_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
        assert_eq!(header_len(0), 10);
    }

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            tap_offloads(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
