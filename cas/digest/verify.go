package digest

import (
	"hash"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NewVerifyingReader returns a reader that yields r's bytes and, instead of
// io.EOF, returns an INVALID_ARGUMENT error if r yields more or fewer bytes
// than d.Size() or its hash differs from d. A consumer that commits data
// only after reading io.EOF therefore never commits a wrong blob.
func NewVerifyingReader(r io.Reader, d Digest) io.Reader {
	return &verifyingReader{r: r, d: d, h: d.fn.New()}
}

type verifyingReader struct {
	r   io.Reader
	d   Digest
	h   hash.Hash
	n   int64
	err error
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.n += int64(n)
		if v.n > v.d.size {
			v.err = status.Errorf(codes.InvalidArgument, "blob %s: received more than %d bytes", v.d, v.d.size)
			return 0, v.err
		}
		v.h.Write(p[:n])
	}
	if err == io.EOF {
		if v.n != v.d.size {
			v.err = status.Errorf(codes.InvalidArgument, "blob %s: received %d bytes, expected %d", v.d, v.n, v.d.size)
			return n, v.err
		}
		got := Digest{fn: v.d.fn, size: v.n}
		v.h.Sum(got.hash[:0])
		if got != v.d {
			v.err = MismatchError(v.d, got)
			return n, v.err
		}
		v.err = io.EOF
	} else if err != nil {
		v.err = err
	}
	return n, err
}
