// Package blobstore defines BlobAccess, the one interface every storage
// backend of tvixfarm implements, and the backends themselves. Backends are
// composed as decorators (a tiered store wraps a local and a remote one), in
// the shape of Buildbarn's blob access stack; package config builds such a
// stack from the configuration file.
//
// The same backends serve the content-addressable store (Kind CAS: the key
// is the digest of the value, which backends verify) and the action cache
// (Kind AC: the key is an action digest, the value an ActionResult).
package blobstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tvixfarm/cas/digest"
)

// BlobAccess stores blobs keyed by digest. Errors are gRPC status errors:
// NotFound for a missing blob, InvalidArgument for data that does not match
// its digest, ResourceExhausted when the backend is full, Unavailable when a
// remote backend cannot be reached.
type BlobAccess interface {
	// Get returns a reader for the blob d. A CAS backend's reader yields
	// exactly d.Size() bytes that match d, or an error; it never yields
	// wrong bytes followed by io.EOF.
	Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error)
	// Put stores the blob d, read from r. The blob becomes visible only
	// after r has returned io.EOF and, for CAS backends, its bytes have been
	// verified against d; on any error nothing is stored.
	Put(ctx context.Context, d digest.Digest, r io.Reader) error
	// FindMissing returns the digests in ds that are not stored, in the
	// order of ds. Finding a blob extends its lifetime, as REAPI requires.
	FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error)
}

// Kind says what a backend stores.
type Kind uint8

const (
	// CAS stores blobs under the digest of their contents.
	CAS Kind = iota
	// AC stores action results under the digest of their action.
	AC
)

// MaxACEntrySize bounds the size of a serialized ActionResult.
const MaxACEntrySize = 16 << 20

// String names the kind in messages.
func (k Kind) String() string {
	if k == AC {
		return "action cache"
	}
	return "cas"
}

// checkPut wraps the reader of a Put so that the backend reading it to
// io.EOF has verified the data: against its digest for the CAS, against
// MaxACEntrySize for the action cache.
func (k Kind) checkPut(d digest.Digest, r io.Reader) io.Reader {
	if k == CAS {
		return digest.NewVerifyingReader(r, d)
	}
	return &limitReader{r: r, n: MaxACEntrySize}
}

// readAll reads a Put's reader completely, verified as checkPut describes.
func (k Kind) readAll(d digest.Digest, r io.Reader) ([]byte, error) {
	if br, ok := r.(*bytes.Reader); ok && k == CAS && br.Len() == int(d.Size()) {
		// Fast path for batch uploads: verify in place.
		buf := make([]byte, br.Len())
		if _, err := io.ReadFull(br, buf); err != nil {
			return nil, err
		}
		if err := d.Verify(buf); err != nil {
			return nil, err
		}
		return buf, nil
	}
	var buf bytes.Buffer
	if k == CAS {
		// ReadFrom wants MinRead bytes of room before each read, also the
		// one that returns io.EOF; without them a full buffer is doubled
		// (and the copy kept by the memory store) just to see io.EOF.
		buf.Grow(int(min(d.Size(), 64<<20)) + bytes.MinRead)
	}
	if _, err := buf.ReadFrom(k.checkPut(d, r)); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		return 0, status.Errorf(codes.InvalidArgument, "action cache entry is larger than %d bytes", MaxACEntrySize)
	}
	return n, err
}

// NotFound returns the error for a missing blob.
func NotFound(k Kind, d digest.Digest) error {
	return status.Errorf(codes.NotFound, "%s: blob %s not found", k, d)
}

// IsNotFound reports whether err is a NotFound status.
func IsNotFound(err error) bool { return status.Code(err) == codes.NotFound }

// GetBytes reads the whole blob d from ba. It refuses blobs larger than max.
// The result may be the store's own copy: callers must not modify it.
func GetBytes(ctx context.Context, ba BlobAccess, d digest.Digest, max int64) ([]byte, error) {
	if d.Size() > max {
		return nil, status.Errorf(codes.InvalidArgument, "blob %s is larger than %d bytes", d, max)
	}
	rc, err := ba.Get(ctx, d)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	if br, ok := rc.(interface{ Bytes() []byte }); ok {
		return br.Bytes(), nil
	}
	buf := bytes.NewBuffer(make([]byte, 0, d.Size()))
	if _, err := buf.ReadFrom(io.LimitReader(rc, max+1)); err != nil {
		return nil, err
	}
	if int64(buf.Len()) > max {
		return nil, status.Errorf(codes.InvalidArgument, "blob %s is larger than %d bytes", d, max)
	}
	return buf.Bytes(), nil
}

// PutBytes stores data under d.
func PutBytes(ctx context.Context, ba BlobAccess, d digest.Digest, data []byte) error {
	return ba.Put(ctx, d, bytes.NewReader(data))
}

// bytesReadCloser serves an in-memory blob and exposes it to GetBytes.
type bytesReadCloser struct {
	*bytes.Reader
	b []byte
}

func newBytesReadCloser(b []byte) *bytesReadCloser {
	return &bytesReadCloser{Reader: bytes.NewReader(b), b: b}
}

func (b *bytesReadCloser) Close() error { return nil }

// Bytes returns the whole blob.
func (b *bytesReadCloser) Bytes() []byte { return b.b }

// ioError converts a local I/O error into a status error; a full disk
// becomes ResourceExhausted.
func ioError(err error, format string, args ...any) error {
	if _, ok := status.FromError(err); ok && !errors.Is(err, syscall.ENOSPC) {
		if s, _ := status.FromError(err); s.Code() != codes.Unknown {
			return err
		}
	}
	msg := fmt.Sprintf(format, args...)
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return status.Errorf(codes.ResourceExhausted, "%s: disk full: %v", msg, err)
	}
	return status.Errorf(codes.Internal, "%s: %v", msg, err)
}
