//! Fuzzes the backup reader under the age layer (age's scrypt passphrase or X25519 key
//! makes fuzzing through it pointless): `tend_backup::verify_plain` over the decrypted
//! zstd-compressed tar. Any input must give a report or a typed error; a panic, or an
//! allocation a hostile length asks for before the bytes that back it, is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Refusing an archive is fine; panicking is not.
    let _ = tend_backup::verify_plain(data);
});
