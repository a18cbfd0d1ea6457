// Package blobstoretest holds the conformance suite every BlobAccess
// backend must pass, and helpers for backend-specific tests.
package blobstoretest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/blobstore"
	"tvixfarm/cas/digest"
)

// Rand returns a deterministic random source for a test, seeded from its
// name, so that failures reproduce.
func Rand(t testing.TB) *rand.Rand {
	var seed uint64 = 14695981039346656037
	for _, c := range []byte(t.Name()) {
		seed = (seed ^ uint64(c)) * 1099511628211
	}
	return rand.New(rand.NewPCG(seed, 0x7461767866))
}

// RandomBytes returns n random bytes, drawn from a ChaCha8 stream seeded
// from rng (much faster than rng byte by byte, also under -race).
func RandomBytes(rng *rand.Rand, n int) []byte {
	var seed [32]byte
	for i := 0; i < 32; i += 8 {
		binary.LittleEndian.PutUint64(seed[i:], rng.Uint64())
	}
	b := make([]byte, n)
	rand.NewChaCha8(seed).Read(b)
	return b
}

// Blob is test data together with its digest.
type Blob struct {
	Data   []byte
	Digest digest.Digest
}

// NewBlob returns data with its digest under fn.
func NewBlob(fn digest.Function, data []byte) Blob {
	return Blob{Data: data, Digest: digest.Compute(fn, data)}
}

// RandomBlob returns a random blob of n bytes.
func RandomBlob(rng *rand.Rand, fn digest.Function, n int) Blob {
	return NewBlob(fn, RandomBytes(rng, n))
}

// FreshBlob returns a random blob of n bytes that ba does not hold yet
// (short random blobs can repeat).
func FreshBlob(t testing.TB, ba blobstore.BlobAccess, rng *rand.Rand, fn digest.Function, n int) Blob {
	t.Helper()
	for i := 0; i < 10000; i++ {
		b := RandomBlob(rng, fn, n)
		if !Present(t, ba, b.Digest) {
			return b
		}
	}
	t.Fatalf("FreshBlob: every random %d-byte blob is stored already", n)
	return Blob{}
}

// ErrInjected is the error returned by ErrAfterReader.
var ErrInjected = errors.New("blobstoretest: injected read error")

// ErrAfterReader returns a reader that yields the first n bytes of data and
// then fails with ErrInjected instead of continuing (or returning io.EOF).
// It deliberately is not a *bytes.Reader, so backends take their streaming
// path.
func ErrAfterReader(data []byte, n int) io.Reader {
	return &errAfterReader{data: data[:min(n, len(data))]}
}

type errAfterReader struct{ data []byte }

func (r *errAfterReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, ErrInjected
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// StreamReader returns a reader of data that is not a *bytes.Reader and
// returns short reads, so backends take their streaming path.
func StreamReader(data []byte) io.Reader {
	return &streamReader{data: data}
}

type streamReader struct {
	data []byte
	odd  bool
}

func (r *streamReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	// Alternate between full and short reads, and return the last bytes
	// together with io.EOF, which io.Reader allows.
	if r.odd && len(p) > 1 {
		p = p[:len(p)/2+1]
	}
	r.odd = !r.odd
	n := copy(p, r.data)
	r.data = r.data[n:]
	if len(r.data) == 0 {
		return n, io.EOF
	}
	return n, nil
}

// Readers are the ways the suite hands data to Put: a *bytes.Reader, which
// backends may special-case, and a streaming reader.
var Readers = []struct {
	Name string
	New  func([]byte) io.Reader
}{
	{"bytes", func(b []byte) io.Reader { return bytes.NewReader(b) }},
	{"stream", StreamReader},
}

// WantCode fails the test unless err is a status error with code want.
func WantCode(t testing.TB, err error, want codes.Code, what string) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("%s: got code %v (err %v), want %v", what, got, err, want)
	}
}

// MustPut stores data under d.
func MustPut(t testing.TB, ba blobstore.BlobAccess, d digest.Digest, data []byte) {
	t.Helper()
	if err := ba.Put(context.Background(), d, bytes.NewReader(data)); err != nil {
		t.Fatalf("Put(%s): %v", d.Sprint(), err)
	}
}

// ReadBlob reads the blob d completely with Get.
func ReadBlob(ctx context.Context, ba blobstore.BlobAccess, d digest.Digest) ([]byte, error) {
	rc, err := ba.Get(ctx, d)
	if err != nil {
		return nil, err
	}
	data, err := io.ReadAll(rc)
	if cerr := rc.Close(); err == nil && cerr != nil {
		err = cerr
	}
	return data, err
}

// MustGet reads the blob d and fails the test on error.
func MustGet(t testing.TB, ba blobstore.BlobAccess, d digest.Digest) []byte {
	t.Helper()
	data, err := ReadBlob(context.Background(), ba, d)
	if err != nil {
		t.Fatalf("Get(%s): %v", d.Sprint(), err)
	}
	return data
}

// WantBlob checks that Get of d yields exactly want, and that FindMissing
// does not report d.
func WantBlob(t testing.TB, ba blobstore.BlobAccess, d digest.Digest, want []byte) {
	t.Helper()
	got := MustGet(t, ba, d)
	if !bytes.Equal(got, want) {
		t.Fatalf("Get(%s) returned %d bytes that differ from the %d bytes stored", d.Sprint(), len(got), len(want))
	}
	if Present(t, ba, d) != true {
		t.Fatalf("FindMissing reports %s missing after Get returned it", d.Sprint())
	}
}

// WantAbsent checks that Get of d is NotFound and FindMissing reports it.
func WantAbsent(t testing.TB, ba blobstore.BlobAccess, d digest.Digest) {
	t.Helper()
	rc, err := ba.Get(context.Background(), d)
	if err == nil {
		data, rerr := io.ReadAll(rc)
		rc.Close()
		t.Fatalf("Get(%s) of an absent blob succeeded (read %d bytes, %v), want NotFound", d.Sprint(), len(data), rerr)
	}
	WantCode(t, err, codes.NotFound, "Get of an absent blob "+d.Sprint())
	if Present(t, ba, d) {
		t.Fatalf("FindMissing does not report absent blob %s", d.Sprint())
	}
}

// Present reports whether FindMissing considers d stored.
func Present(t testing.TB, ba blobstore.BlobAccess, d digest.Digest) bool {
	t.Helper()
	missing, err := ba.FindMissing(context.Background(), []digest.Digest{d})
	if err != nil {
		t.Fatalf("FindMissing(%s): %v", d.Sprint(), err)
	}
	switch len(missing) {
	case 0:
		return true
	case 1:
		if missing[0] != d {
			t.Fatalf("FindMissing([%s]) = [%s]", d.Sprint(), missing[0].Sprint())
		}
		return false
	}
	t.Fatalf("FindMissing([%s]) returned %d digests", d.Sprint(), len(missing))
	return false
}

// OtherFunction returns the digest with d's hash and size under the other
// supported digest function.
func OtherFunction(d digest.Digest) digest.Digest {
	fn := digest.BLAKE3
	if d.Function() == digest.BLAKE3 {
		fn = digest.SHA256
	}
	return digest.New(fn, d.Hash(), d.Size())
}
