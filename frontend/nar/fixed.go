package nar

import (
	"bytes"
	"context"
	_ "crypto/md5" // for nixhash.MD5
	_ "crypto/sha1"
	_ "crypto/sha256"
	_ "crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// The output hash modes of fixed-output derivations (outputHashMode).
const (
	// ModeFlat hashes the contents of a regular file.
	ModeFlat = "flat"
	// ModeRecursive hashes the NAR serialisation.
	ModeRecursive = "recursive"
)

// ErrNotRegular is the error of FixedHash and CheckFixed for a flat hash
// of anything but a non-executable regular file, which Nix refuses.
var ErrNotRegular = errors.New("output should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)")

// ParseOutputHash parses the expected hash of a fixed-output derivation as
// Nix 2.8 does, from the outputHash and outputHashAlgo attributes of a
// derivation or from the hash and hashAlgo fields of a .drv output:
//
//   - outputHash is nix32, base16 (either case) or base64, optionally
//     prefixed with "<algo>:", or SRI ("<algo>-<base64>", padding
//     optional); an empty outputHash is the all-zero hash of
//     outputHashAlgo (Nix warns and builds, then reports the real hash).
//   - outputHashAlgo is md5, sha1, sha256 or sha512, optionally with the
//     "r:" prefix of a .drv (the mode is not returned: see SplitHashAlgo),
//     or empty when outputHash names the algorithm. Like Nix's evaluator,
//     an unknown outputHashAlgo counts as empty. If both name an algorithm
//     they must agree.
//
// The result remembers the encoding, for messages.
func ParseOutputHash(outputHash, outputHashAlgo string) (*nixhash.HashWithEncoding, error) {
	_, algoName := SplitHashAlgo(outputHashAlgo)
	var algo *nixhash.Algorithm
	if a, err := nixhash.ParseAlgorithm(algoName); err == nil {
		algo = &a
	}
	if outputHash == "" {
		if algo == nil {
			return nil, fmt.Errorf("empty hash requires explicit hash type")
		}
		return nixhash.NewHashWithEncoding(*algo, make([]byte, algo.Func().Size()), nixhash.SRI, true)
	}
	rest, sri := outputHash, false
	sep := strings.IndexByte(rest, ':')
	if sep < 0 {
		sep = strings.IndexByte(rest, '-')
		sri = sep >= 0
	}
	prefixed := sep >= 0
	if prefixed {
		a, err := nixhash.ParseAlgorithm(rest[:sep])
		if err != nil {
			return nil, fmt.Errorf("unknown hash algorithm '%s'", rest[:sep])
		}
		if algo != nil && *algo != a {
			return nil, fmt.Errorf("hash '%s' should have type '%s'", outputHash, algo)
		}
		algo, rest = &a, rest[sep+1:]
	} else if algo == nil {
		return nil, fmt.Errorf("hash '%s' does not include a type, nor is the type otherwise known from context", outputHash)
	}
	size := algo.Func().Size()
	var raw []byte
	var enc nixhash.Encoding
	var err error
	switch {
	case !sri && len(rest) == 2*size:
		enc = nixhash.Base16
		raw, err = hex.DecodeString(rest)
		if err != nil {
			err = fmt.Errorf("invalid base-16 hash '%s'", rest)
		}
	case !sri && len(rest) == nixbase32.EncodedLen(size):
		enc = nixhash.NixBase32
		raw, err = nixbase32.DecodeString(rest)
		if err != nil || len(raw) != size {
			err = fmt.Errorf("invalid base-32 hash '%s'", rest)
		}
	case sri || len(rest) == (4*size/3+3)&^3:
		enc = nixhash.Base64
		if sri {
			enc = nixhash.SRI
		}
		raw, err = base64Decode(rest)
		if err == nil && len(raw) != size {
			kind := "base-64"
			if sri {
				kind = "SRI"
			}
			err = fmt.Errorf("invalid %s %s hash '%s'", kind, algo, rest)
		}
	default:
		err = fmt.Errorf("hash '%s' has wrong length for hash type '%s'", rest, algo)
	}
	if err != nil {
		return nil, err
	}
	return nixhash.NewHashWithEncoding(*algo, raw, enc, prefixed)
}

// SplitHashAlgo splits the hashAlgo field of a .drv output ("r:sha256",
// "sha256") into the mode (ModeRecursive, ModeFlat) and the algorithm.
func SplitHashAlgo(hashAlgo string) (mode, algo string) {
	if a, ok := strings.CutPrefix(hashAlgo, "r:"); ok {
		return ModeRecursive, a
	}
	return ModeFlat, hashAlgo
}

// base64Decode decodes base64 as Nix 2.8 does: it stops at the first '=',
// skips newlines and fails on other characters outside the alphabet.
func base64Decode(s string) ([]byte, error) {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	var res []byte
	var d, bits uint
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '=' {
			break
		}
		if c == '\n' {
			continue
		}
		v := strings.IndexByte(alphabet, c)
		if v < 0 {
			return nil, fmt.Errorf("invalid character in Base64 string: '%c'", c)
		}
		bits += 6
		d = (d<<6 | uint(v)) & 0xffff
		if bits >= 8 {
			res = append(res, byte(d>>(bits-8)))
			bits -= 8
		}
	}
	return res, nil
}

// FixedHash computes the hash of n, read from cas, as a fixed-output
// derivation's output is hashed: with mode ModeFlat, the contents of a
// non-executable regular file (anything else is ErrNotRegular); with
// ModeRecursive, the NAR serialisation.
func FixedHash(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, n Node, mode string, algo nixhash.Algorithm) (*nixhash.Hash, error) {
	if algo < nixhash.MD5 || algo > nixhash.SHA512 {
		return nil, fmt.Errorf("nar: invalid hash algorithm %d", algo)
	}
	h := algo.Func().New()
	switch mode {
	case ModeFlat:
		if n.Type != Regular || n.Executable {
			return nil, ErrNotRegular
		}
		if n.Digest.Size() > 0 {
			rc, err := cas.Get(ctx, n.Digest)
			if err != nil {
				return nil, fmt.Errorf("nar: file contents %s: %w", n.Digest, err)
			}
			m, err := io.Copy(h, rc)
			rc.Close()
			if err == nil && m != n.Digest.Size() {
				err = fmt.Errorf("read %d bytes", m)
			}
			if err != nil {
				return nil, fmt.Errorf("nar: file contents %s: %w", n.Digest, err)
			}
		}
	case ModeRecursive:
		if err := Write(ctx, cas, fn, n, h); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("nar: invalid value '%s' for 'outputHashMode' attribute", mode)
	}
	return nixhash.NewHash(algo, h.Sum(nil))
}

// CheckFixed computes the hash of n as FixedHash does, with want's
// algorithm, and reports whether it is want. got is the hash in Nix's
// usual form, "<algo>:<nix32>" (SRIString converts it for messages).
func CheckFixed(ctx context.Context, cas blobstore.BlobAccess, fn digest.Function, n Node, mode string, want *nixhash.HashWithEncoding) (got string, ok bool, err error) {
	if want == nil {
		return "", false, errors.New("nar: no expected hash")
	}
	h, err := FixedHash(ctx, cas, fn, n, mode, want.Algo())
	if err != nil {
		return "", false, err
	}
	return h.Format(nixhash.NixBase32, true), bytes.Equal(h.Digest(), want.Digest()), nil
}

// SRIString returns a hash given in any form ParseOutputHash accepts with
// its algorithm (such as CheckFixed's got) in SRI form, or h itself if it
// does not parse.
func SRIString(h string) string {
	p, err := ParseOutputHash(h, "")
	if err != nil {
		return h
	}
	return p.Format(nixhash.SRI, true)
}

// MismatchError returns the error Nix 2.8 reports when the output of the
// fixed-output derivation drvPath (the .drv file's store path) has hash
// got (as CheckFixed returns it) rather than want, both shown in SRI form:
//
//	hash mismatch in fixed-output derivation '/nix/store/…-x.drv':
//	  specified: sha256-…
//	     got:    sha256-…
func MismatchError(drvPath string, want *nixhash.HashWithEncoding, got string) error {
	return fmt.Errorf("hash mismatch in fixed-output derivation '%s':\n  specified: %s\n     got:    %s",
		drvPath, want.Format(nixhash.SRI, true), SRIString(got))
}
