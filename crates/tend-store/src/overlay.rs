//! A copy-on-write redb storage backend over a file opened read-only: redb may "write" (repair,
//! mark the file open) while we inspect a file, but every write lands in memory, so the file
//! on disk is never modified.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Mutex;

use redb::StorageBackend;

type BackendIoError = std::io::Error;

const BLOCK: u64 = 4096;

/// Reads come from the file unless a block was written; writes go to memory only.
#[derive(Debug)]
pub(crate) struct OverlayBackend {
    file: File,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Logical length of the storage.
    len: u64,
    /// File bytes at or above this offset are hidden (the storage was shrunk below it once;
    /// regrown space reads as zeros).
    visible: u64,
    blocks: HashMap<u64, Box<[u8]>>,
}

impl OverlayBackend {
    /// Wraps a file opened for reading.
    pub(crate) fn new(file: File) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            inner: Mutex::new(Inner {
                len,
                visible: len,
                blocks: HashMap::new(),
            }),
        })
    }

    fn read_base(&self, visible: u64, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        out.fill(0);
        if offset >= visible {
            return Ok(());
        }
        let avail = usize::try_from(visible - offset).unwrap_or(usize::MAX);
        let n = out.len().min(avail);
        read_exact_at(&self.file, &mut out[..n], offset)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

fn out_of_range() -> BackendIoError {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "read beyond the end of the file",
    )
}

impl StorageBackend for OverlayBackend {
    fn len(&self) -> Result<u64, BackendIoError> {
        Ok(self.inner.lock().map_err(|_| out_of_range())?.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        let inner = self.inner.lock().map_err(|_| out_of_range())?;
        let end = offset
            .checked_add(out.len() as u64)
            .ok_or_else(out_of_range)?;
        if end > inner.len {
            return Err(out_of_range());
        }
        let mut pos = offset;
        let mut done = 0usize;
        while done < out.len() {
            let block = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match inner.blocks.get(&block) {
                Some(b) => dst.copy_from_slice(&b[within..within + n]),
                None => self.read_base(inner.visible, pos, dst)?,
            }
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let mut inner = self.inner.lock().map_err(|_| out_of_range())?;
        if len < inner.len {
            inner.visible = inner.visible.min(len);
            let first_gone = len.div_ceil(BLOCK);
            inner.blocks.retain(|b, _| *b < first_gone);
            // Zero the tail of a partly kept block.
            if let Some(b) = inner.blocks.get_mut(&(len / BLOCK)) {
                b[(len % BLOCK) as usize..].fill(0);
            }
        }
        inner.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let mut guard = self.inner.lock().map_err(|_| out_of_range())?;
        let inner = &mut *guard;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(out_of_range)?;
        if end > inner.len {
            return Err(out_of_range());
        }
        let mut pos = offset;
        let mut done = 0usize;
        while done < data.len() {
            let block = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(data.len() - done);
            if !inner.blocks.contains_key(&block) {
                let mut b = vec![0u8; BLOCK as usize].into_boxed_slice();
                self.read_base(inner.visible, block * BLOCK, &mut b)?;
                inner.blocks.insert(block, b);
            }
            if let Some(b) = inner.blocks.get_mut(&block) {
                b[within..within + n].copy_from_slice(&data[done..done + n]);
            }
            done += n;
            pos += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn writes_stay_in_memory() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1u8; 10_000]).unwrap();
        let o = OverlayBackend::new(File::open(f.path()).unwrap()).unwrap();
        o.write(4090, &[2u8; 20]).unwrap();
        let mut buf = [0u8; 30];
        o.read(4085, &mut buf).unwrap();
        assert_eq!(&buf[..5], &[1; 5]);
        assert_eq!(&buf[5..25], &[2; 20]);
        assert_eq!(&buf[25..], &[1; 5]);
        o.set_len(5000).unwrap();
        o.set_len(12_000).unwrap();
        let mut tail = [9u8; 100];
        o.read(4990, &mut tail).unwrap();
        assert_eq!(&tail[..10], &[1; 10]);
        assert_eq!(&tail[10..], &[0; 90]);
        assert!(o.read(11_999, &mut [0u8; 2]).is_err());
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![1u8; 10_000]);
    }
}
