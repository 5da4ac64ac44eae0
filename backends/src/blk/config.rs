//! The device's feature bits and its `struct virtio_blk_config`, served through GET_CONFIG.

use std::mem::offset_of;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest queue the frontend may configure.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most queues `--queues` accepts.
pub const MAX_QUEUES: u16 = 8;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Sectors per discard / write-zeroes segment (4 GiB - 512 bytes).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;
/// The block size the guest is told (the logical block size; I/O is still in 512-byte sectors).
pub const BLK_SIZE: u32 = 512;

/// Bytes of `virtio_blk_config` this device describes: everything up to and including
/// `write_zeroes_may_unmap` and its padding (secure erase and zoned fields are not offered).
pub const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// What the config space says about one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// Whether the disk refuses writes.
    pub readonly: bool,
}

impl BlkConfig {
    /// The virtio feature bits offered to the frontend (including
    /// `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.readonly {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The vhost-user protocol features offered. INFLIGHT_SHMFD's two messages are answered
    /// by the relay in [`crate::vhost_common`] (vhost-user-backend refuses them).
    pub fn protocol_features() -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// The config space, little-endian, [`CONFIG_LEN`] bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &u32::from(MAX_QUEUE_SIZE - 2).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &BLK_SIZE.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        if !self.readonly {
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_discard_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &1u32.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            );
            put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(CONFIG_LEN, 60);
        let c = BlkConfig {
            capacity: 0x1122_3344_5566_7788,
            num_queues: 3,
            readonly: false,
        };
        let b = c.bytes();
        assert_eq!(&b[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[20..24], &512u32.to_le_bytes());
        assert_eq!(&b[34..36], &3u16.to_le_bytes());
        assert_eq!(c.read(34, 2), vec![3, 0]);
        assert_eq!(c.read(58, 4), vec![0, 0, 0, 0]);
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
        assert_ne!(c.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let ro = BlkConfig {
            readonly: true,
            ..c
        };
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }
}
