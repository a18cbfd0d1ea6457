// Package digest holds the validated digest value type used everywhere
// inside tvixfarm. Digests arriving over the network (REAPI protos, resource
// names) are parsed and validated once, at the edge, into a Digest; all other
// code works on Digest values and never re-checks them.
package digest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"strconv"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"github.com/zeebo/blake3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// HashSize is the length in bytes of every hash tvixfarm supports.
// Both SHA-256 and BLAKE3 (with its default output length) produce 32 bytes.
const HashSize = 32

// Function is a digest function supported by tvixfarm.
type Function uint8

const (
	// SHA256 is REAPI's default digest function.
	SHA256 Function = iota + 1
	// BLAKE3 is the digest function of Tvix's castore, so blobs stored under
	// it are shared between REAPI clients and Tvix clients.
	BLAKE3
)

// Functions lists the supported digest functions in the order they are
// announced in the capabilities.
var Functions = []Function{SHA256, BLAKE3}

// String returns the lowercase name REAPI uses in resource names.
func (f Function) String() string {
	switch f {
	case SHA256:
		return "sha256"
	case BLAKE3:
		return "blake3"
	}
	return "unknown(" + strconv.Itoa(int(f)) + ")"
}

// Proto returns the REAPI enum value of f.
func (f Function) Proto() repb.DigestFunction_Value {
	switch f {
	case SHA256:
		return repb.DigestFunction_SHA256
	case BLAKE3:
		return repb.DigestFunction_BLAKE3
	}
	return repb.DigestFunction_UNKNOWN
}

// New returns a new hasher for f.
func (f Function) New() hash.Hash {
	if f == BLAKE3 {
		return blake3.New()
	}
	return sha256.New()
}

// legacy reports whether REAPI requires the function's name to be omitted
// from resource names (the server infers it from the hash length).
func (f Function) legacy() bool { return f == SHA256 }

// FunctionFromProto converts a REAPI digest function. UNKNOWN (the field
// was absent) means SHA-256, as REAPI 2.3 specifies for 64-hex-digit hashes,
// the only length tvixfarm's functions have.
func FunctionFromProto(v repb.DigestFunction_Value) (Function, error) {
	switch v {
	case repb.DigestFunction_UNKNOWN, repb.DigestFunction_SHA256:
		return SHA256, nil
	case repb.DigestFunction_BLAKE3:
		return BLAKE3, nil
	}
	return 0, status.Errorf(codes.InvalidArgument, "digest function %s is not supported (supported: sha256, blake3)", v)
}

// FunctionFromName parses a lowercase digest function name as it appears in
// resource names.
func FunctionFromName(name string) (Function, bool) {
	switch name {
	case "sha256":
		return SHA256, true
	case "blake3":
		return BLAKE3, true
	}
	return 0, false
}

// Digest identifies a blob by digest function, hash and size. Digests are
// comparable and may be used as map keys. The zero Digest is invalid.
type Digest struct {
	fn   Function
	hash [HashSize]byte
	size int64
}

// New returns the digest with the given components. It panics if size is
// negative or fn is not a supported function; use Parse for untrusted input.
func New(fn Function, h [HashSize]byte, size int64) Digest {
	if size < 0 || (fn != SHA256 && fn != BLAKE3) {
		panic("digest.New: invalid digest")
	}
	return Digest{fn: fn, hash: h, size: size}
}

// Compute returns the digest of data under fn.
func Compute(fn Function, data []byte) Digest {
	d := Digest{fn: fn, size: int64(len(data))}
	switch fn {
	case SHA256:
		d.hash = sha256.Sum256(data)
	case BLAKE3:
		d.hash = blake3.Sum256(data)
	default:
		panic("digest.Compute: invalid function")
	}
	return d
}

var empties = [...]Digest{SHA256: Compute(SHA256, nil), BLAKE3: Compute(BLAKE3, nil)}

// Empty returns the digest of the empty blob under fn.
func Empty(fn Function) Digest {
	if int(fn) < len(empties) && fn != 0 {
		return empties[fn]
	}
	return Compute(fn, nil)
}

// unhex maps lowercase hex digits to their value and every other byte to 0xff.
var unhex = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = byte(c - '0')
	}
	for c := 'a'; c <= 'f'; c++ {
		t[c] = byte(c - 'a' + 10)
	}
	return t
}()

// Parse validates a hex hash and size for fn.
func Parse(fn Function, hexHash string, size int64) (Digest, error) {
	if fn != SHA256 && fn != BLAKE3 {
		return Digest{}, status.Errorf(codes.InvalidArgument, "unsupported digest function %d", fn)
	}
	if len(hexHash) != 2*HashSize {
		return Digest{}, status.Errorf(codes.InvalidArgument, "digest hash %q has length %d, %s needs %d hex digits", truncate(hexHash), len(hexHash), fn, 2*HashSize)
	}
	d := Digest{fn: fn, size: size}
	for i := 0; i < HashSize; i++ {
		hi, lo := unhex[hexHash[2*i]], unhex[hexHash[2*i+1]]
		if hi|lo > 0x0f {
			j := 2 * i
			if hi <= 0x0f {
				j++
			}
			return Digest{}, status.Errorf(codes.InvalidArgument, "digest hash %q is not lowercase hex (byte %d is %q)", truncate(hexHash), j, hexHash[j])
		}
		d.hash[i] = hi<<4 | lo
	}
	if size < 0 {
		return Digest{}, status.Errorf(codes.InvalidArgument, "digest %s/%d has a negative size", hexHash, size)
	}
	return d, nil
}

// FromProto validates a REAPI digest received under digest function fn.
func FromProto(fn Function, pd *repb.Digest) (Digest, error) {
	if pd == nil {
		return Digest{}, status.Error(codes.InvalidArgument, "digest is missing")
	}
	return Parse(fn, pd.Hash, pd.SizeBytes)
}

// Function returns the digest function of d.
func (d Digest) Function() Function { return d.fn }

// Hash returns the raw hash of d.
func (d Digest) Hash() [HashSize]byte { return d.hash }

// Hex returns the hash of d in lowercase hex.
func (d Digest) Hex() string { return hex.EncodeToString(d.hash[:]) }

// Size returns the size in bytes of the blob d identifies.
func (d Digest) Size() int64 { return d.size }

// IsZero reports whether d is the zero (invalid) Digest.
func (d Digest) IsZero() bool { return d.fn == 0 }

// Proto returns d as a REAPI digest.
func (d Digest) Proto() *repb.Digest {
	return &repb.Digest{Hash: d.Hex(), SizeBytes: d.size}
}

// String formats d as "hash/size" for SHA-256 and "blake3/hash/size"
// otherwise, the form REAPI resource names use.
func (d Digest) String() string {
	if d.fn.legacy() {
		return d.Hex() + "/" + strconv.FormatInt(d.size, 10)
	}
	return d.fn.String() + "/" + d.Hex() + "/" + strconv.FormatInt(d.size, 10)
}

// Verify reports an INVALID_ARGUMENT error naming the expected and actual
// digests if data does not match d.
func (d Digest) Verify(data []byte) error {
	got := Compute(d.fn, data)
	if got != d {
		return MismatchError(d, got)
	}
	return nil
}

// MismatchError returns the error for data that does not match its digest.
func MismatchError(want, got Digest) error {
	return status.Errorf(codes.InvalidArgument, "digest mismatch: expected %s, got %s", want, got)
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Sprint is a helper for log messages: it formats a digest with its
// function name always present.
func (d Digest) Sprint() string {
	return fmt.Sprintf("%s:%s/%d", d.fn, d.Hex(), d.size)
}
