// Package nar turns store paths as the farm holds them (REAPI trees in the
// CAS) into Nix archives, and back from the local file system.
//
// A store path's contents are a Node: the digest of a REAPI Directory
// message, a regular file's digest and executable bit, or a symlink
// target. The package provides:
//
//   - Write: the NAR serialisation of a Node read from the CAS,
//     bit-identical to `nix-store --dump` of the same tree on disk, with
//     blobs prefetched concurrently and written strictly in order.
//   - Hasher and Scanner: the NAR's SHA-256 and size and the store paths
//     it refers to, found as Nix finds them (the 32-character nix32 hash
//     part of a candidate anywhere in the NAR: file contents, names and
//     symlink targets), also across write boundaries. Info combines both.
//   - Dump and Ingest: a local path (the local /nix/store) as a NAR, and as
//     a Node plus the blobs it needs, with Upload storing those the CAS
//     lacks.
//   - ParseOutputHash and CheckFixed: the expected hash of a fixed-output
//     derivation in every form Nix 2.8 accepts, and the check of an output
//     against it, flat or recursive.
//
// NAR rules, as Nix 2.8 and Tvix apply them: every token is a little-endian u64 length, the
// bytes, and zero padding to a multiple of 8; directory entries are sorted
// by the raw bytes of their names across files, directories and symlinks;
// a file is executable iff its owner execute bit is set; directory modes,
// owners and times are not recorded.
package nar
