//! The device's iroh endpoint (loopback-only, device key as endpoint key) and the
//! length-prefixed framing sync messages travel in.

use std::net::SocketAddr;

use iroh::endpoint::{presets, RecvStream, SendStream, VarInt};
use iroh::{Endpoint, EndpointAddr, RelayMode, SecretKey};
use tend_core::DeviceId;
use tend_crypto::device::DeviceKey;

/// ALPN of the tend sync protocol, version 1.
pub const SYNC_ALPN: &[u8] = b"tend/sync/1";

/// ALPN of the blob transfer protocol, version 1 (see `crate::blobs`).
pub const BLOB_ALPN: &[u8] = b"tend/blob/1";

/// ALPN of the maintenance protocol (snapshot ceremonies, key generation), version 1
/// (see `crate::ceremony`).
pub const MAINT_ALPN: &[u8] = b"tend/maint/1";

/// Bytes of the frame length prefix (u32, big endian).
pub const FRAME_HEADER: usize = 4;

/// Application close codes of a sync connection, sent with a reason string.
pub mod close_code {
    /// Normal close after the sessions ended.
    pub const DONE: u32 = 0;
    /// The remote key is not a member of the authority (refused at the handshake).
    pub const NOT_MEMBER: u32 = 1;
    /// The peer broke the protocol (garbage, oversized frame, invalid facts).
    pub const MISBEHAVIOUR: u32 = 2;
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 3;
}

/// Why the endpoint or a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid listen address {addr}: {detail}")]
    BadAddress { addr: SocketAddr, detail: String },
    #[error("cannot bind the iroh endpoint: {0}")]
    Bind(String),
    #[error("the device id {0} is not a valid endpoint key")]
    BadKey(DeviceId),
}

/// Why reading or writing one frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit: the peer misbehaves.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized { len: usize, max: usize },
    #[error("stream closed")]
    Closed,
    #[error("stream error: {0}")]
    Io(String),
}

/// Builds a loopback-only endpoint whose key is the device key (DESIGN section 4):
/// `presets::Minimal`, relays disabled, one IP transport bound to `listen` (which must be
/// a loopback address in tests and devnets). Never the N0 preset: it reaches for public
/// relay and DNS servers.
pub async fn bind(key: &DeviceKey, listen: SocketAddr) -> Result<Endpoint, EndpointError> {
    bind_alpns(
        key,
        listen,
        vec![SYNC_ALPN.to_vec(), MAINT_ALPN.to_vec(), BLOB_ALPN.to_vec()],
    )
    .await
}

/// [`bind`] accepting only `alpns` (none for an endpoint that only connects out; the
/// storage peer's `tend/vault/1` alone for a storage peer).
pub async fn bind_alpns(
    key: &DeviceKey,
    listen: SocketAddr,
    alpns: Vec<Vec<u8>>,
) -> Result<Endpoint, EndpointError> {
    let secret = SecretKey::from_bytes(&key.signing_key().to_bytes());
    Endpoint::builder(presets::Minimal)
        .secret_key(secret)
        .relay_mode(RelayMode::Disabled)
        .clear_ip_transports()
        .bind_addr(listen)
        .map_err(|e| EndpointError::BadAddress {
            addr: listen,
            detail: e.to_string(),
        })?
        .alpns(alpns)
        .bind()
        .await
        .map_err(|e| EndpointError::Bind(e.to_string()))
}

/// The first bound socket of the endpoint.
pub fn local_addr(ep: &Endpoint) -> Option<SocketAddr> {
    ep.bound_sockets().into_iter().next()
}

/// The iroh address of a device at a direct socket address.
pub fn endpoint_addr(device: DeviceId, addr: SocketAddr) -> Result<EndpointAddr, EndpointError> {
    let id = iroh::PublicKey::from_bytes(&device.0).map_err(|_| EndpointError::BadKey(device))?;
    Ok(EndpointAddr::new(id).with_ip_addr(addr))
}

/// The device id of an endpoint id (the same 32 bytes).
pub fn device_of(id: iroh::EndpointId) -> DeviceId {
    DeviceId(*id.as_bytes())
}

/// A close code as QUIC wants it.
pub fn code(c: u32) -> VarInt {
    VarInt::from_u32(c)
}

/// Writes one frame: a u32 big-endian length, then the bytes.
pub async fn write_frame(send: &mut SendStream, bytes: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::Oversized {
        len: bytes.len(),
        max: u32::MAX as usize,
    })?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    send.write_all(bytes)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))
}

/// Reads one frame of at most `max` bytes. A clean end of stream before a header is
/// [`FrameError::Closed`]; a length over `max` is refused before anything is buffered.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; FRAME_HEADER];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(iroh::endpoint::ReadExactError::FinishedEarly(0)) => return Err(FrameError::Closed),
        Err(e) => return Err(FrameError::Io(e.to_string())),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::Oversized { len, max });
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| FrameError::Io(e.to_string()))?;
    Ok(buf)
}
