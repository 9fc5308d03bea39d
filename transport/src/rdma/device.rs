// SPDX-License-Identifier: Apache-2.0 OR MIT
//! RDMA device discovery: list the devices libibverbs sees, open one by name (or the first), and
//! read the limits the rest of the backend sizes itself by.
//!
//! Owns: [`list_devices`], [`RdmaDevice`], [`DeviceLimits`] and the typed [`DeviceError`] (with
//! [`DeviceError::NoDevice`] for machines without RDMA hardware, which tests use to skip).
//! Does not own: connection setup (rdmacm picks the device from the IP route, see `conn`).

use std::sync::Arc;

use sideway::ibverbs::device::{DeviceInfo, DeviceList, GetDeviceListError, OpenDeviceError};
use sideway::ibverbs::device_context::AllocateProtectionDomainError;
use sideway::ibverbs::device_context::{DeviceAttr, DeviceContext, QueryDeviceError};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use thiserror::Error;

/// An RDMA device could not be found, opened or queried.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// libibverbs could not list devices (library or kernel support missing).
    #[error("RDMA device list unavailable")]
    Unavailable(#[source] GetDeviceListError),
    /// libibverbs lists no device.
    #[error("No RDMA device")]
    NoDevice,
    /// No device has the requested name.
    #[error("No RDMA device named {name} (found: {available})")]
    NotFound {
        /// The requested name.
        name: String,
        /// Names that exist, comma separated.
        available: String,
    },
    /// Opening the device failed.
    #[error("Cannot open RDMA device {name}")]
    Open {
        /// Device name.
        name: String,
        /// The verbs error.
        #[source]
        source: OpenDeviceError,
    },
    /// Querying the device attributes failed.
    #[error("Cannot query RDMA device {name}")]
    Query {
        /// Device name.
        name: String,
        /// The verbs error.
        #[source]
        source: QueryDeviceError,
    },
    /// Allocating a protection domain failed.
    #[error("Cannot allocate a protection domain on {name}")]
    AllocPd {
        /// Device name.
        name: String,
        /// The verbs error.
        #[source]
        source: AllocateProtectionDomainError,
    },
}

impl DeviceError {
    /// The machine has no usable RDMA device (tests skip on this).
    pub fn is_no_device(&self) -> bool {
        matches!(self, DeviceError::NoDevice | DeviceError::Unavailable(_))
    }
}

/// One device as listed by libibverbs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Kernel name, e.g. `mlx5_0`.
    pub name: String,
    /// Node GUID.
    pub guid: u64,
    /// Transport (InfiniBand, iWARP, ...), as text.
    pub transport: String,
}

/// The device limits the backend sizes registrations and queues by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Largest single memory registration; guest memory is chunked by it.
    pub max_mr_size: u64,
    /// Most work requests per queue.
    pub max_qp_wr: u32,
    /// Most scatter-gather entries per work request.
    pub max_sge: u32,
    /// Most entries per completion queue.
    pub max_cqe: u32,
    /// Most RDMA READs a queue pair serves at once as responder.
    pub max_qp_rd_atom: u8,
    /// Most RDMA READs a queue pair keeps outstanding as initiator.
    pub max_qp_init_rd_atom: u8,
    /// Physical ports.
    pub phys_port_cnt: u8,
}

fn clamp_u32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

fn clamp_u8(v: i32) -> u8 {
    u8::try_from(v.max(0)).unwrap_or(u8::MAX)
}

impl DeviceLimits {
    /// Reads the limits from queried device attributes (negative values become 0).
    pub fn from_attr(attr: &DeviceAttr) -> Self {
        Self {
            max_mr_size: attr.max_mr_size(),
            max_qp_wr: clamp_u32(attr.max_qp_wr()),
            max_sge: clamp_u32(attr.max_sge()),
            max_cqe: clamp_u32(attr.max_cqe()),
            max_qp_rd_atom: clamp_u8(attr.max_qp_rd_atom()),
            max_qp_init_rd_atom: clamp_u8(attr.max_qp_init_rd_atom()),
            phys_port_cnt: attr.phys_port_cnt(),
        }
    }

    /// Queries `ctx`.
    pub(crate) fn query(ctx: &DeviceContext, name: &str) -> Result<Self, DeviceError> {
        let attr = ctx.query_device().map_err(|source| DeviceError::Query {
            name: name.to_owned(),
            source,
        })?;
        Ok(Self::from_attr(&attr))
    }
}

/// Lists the RDMA devices; an empty list is not an error here (see [`RdmaDevice::open`]).
pub fn list_devices() -> Result<Vec<DeviceSummary>, DeviceError> {
    let list = DeviceList::new().map_err(DeviceError::Unavailable)?;
    Ok(list
        .iter()
        .map(|d| DeviceSummary {
            name: d.name(),
            guid: d.guid().as_u64(),
            transport: d.transport_type().to_string(),
        })
        .collect())
}

/// An open RDMA device with its limits.
#[derive(Debug, Clone)]
pub struct RdmaDevice {
    ctx: Arc<DeviceContext>,
    name: String,
    limits: DeviceLimits,
}

impl RdmaDevice {
    /// Opens the device called `name`, or the first one when `name` is `None`.
    pub fn open(name: Option<&str>) -> Result<Self, DeviceError> {
        let list = DeviceList::new().map_err(DeviceError::Unavailable)?;
        if list.is_empty() {
            return Err(DeviceError::NoDevice);
        }
        let dev = match name {
            None => list.get(0).ok_or(DeviceError::NoDevice)?,
            Some(want) => {
                list.iter()
                    .find(|d| d.name() == want)
                    .ok_or_else(|| DeviceError::NotFound {
                        name: want.to_owned(),
                        available: list.iter().map(|d| d.name()).collect::<Vec<_>>().join(","),
                    })?
            }
        };
        let name = dev.name();
        let ctx = dev.open().map_err(|source| DeviceError::Open {
            name: name.clone(),
            source,
        })?;
        let limits = DeviceLimits::query(&ctx, &name)?;
        Ok(Self { ctx, name, limits })
    }

    /// Device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Device limits.
    pub fn limits(&self) -> DeviceLimits {
        self.limits
    }

    /// A protection domain on this device, to register memory on without a connection (the
    /// registrations used by a connection must live on the connection's own protection domain,
    /// see `RdmaConnection::pd`).
    pub fn alloc_pd(&self) -> Result<super::memory::RdmaPd, DeviceError> {
        alloc_pd(&self.ctx, &self.name, self.limits)
    }
}

pub(crate) fn alloc_pd(
    ctx: &Arc<DeviceContext>,
    name: &str,
    limits: DeviceLimits,
) -> Result<super::memory::RdmaPd, DeviceError> {
    let pd: Arc<ProtectionDomain> = ctx.alloc_pd().map_err(|source| DeviceError::AllocPd {
        name: name.to_owned(),
        source,
    })?;
    Ok(super::memory::RdmaPd::new(
        pd,
        Arc::clone(ctx),
        name.to_owned(),
        limits,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps() {
        assert_eq!(clamp_u32(-1), 0);
        assert_eq!(clamp_u32(16384), 16384);
        assert_eq!(clamp_u8(-3), 0);
        assert_eq!(clamp_u8(16), 16);
        assert_eq!(clamp_u8(1000), 255);
    }

    #[test]
    fn open_without_device_is_typed() {
        // On machines with hardware this opens it; without, the error must say so plainly.
        match RdmaDevice::open(None) {
            Ok(dev) => assert!(dev.limits().max_qp_wr > 0),
            Err(e) => {
                assert!(e.is_no_device(), "unexpected error: {e}");
                eprintln!("skipping device part: {e}");
            }
        }
        match RdmaDevice::open(Some("ferry-no-such-device")) {
            Ok(_) => panic!("opened a device that does not exist"),
            Err(DeviceError::NotFound { name, .. }) => assert_eq!(name, "ferry-no-such-device"),
            Err(e) => assert!(e.is_no_device(), "unexpected error: {e}"),
        }
    }
}
