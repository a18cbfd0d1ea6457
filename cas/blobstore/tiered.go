package blobstore

import (
	"context"
	"io"
	"log/slog"

	"tvixfarm/cas/digest"
)

// NewTiered returns a BlobAccess with a local cache in front of a remote
// store: reads are served locally when possible and otherwise fetched from
// the remote and kept locally (read-through); writes go to both
// (write-through) and succeed when the remote has the blob. This is the
// shape an executor uses in front of the farm's CAS.
func NewTiered(local, remote BlobAccess) BlobAccess {
	return &tiered{local: local, remote: remote}
}

type tiered struct {
	local, remote BlobAccess
}

func (t *tiered) Get(ctx context.Context, d digest.Digest) (io.ReadCloser, error) {
	rc, err := t.local.Get(ctx, d)
	if err == nil || !IsNotFound(err) {
		return rc, err
	}
	rc, err = t.remote.Get(ctx, d)
	if err != nil {
		return nil, err
	}
	// Fill the local cache while the caller reads: the local store commits
	// only if the whole, verified blob passes through.
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := t.local.Put(context.WithoutCancel(ctx), d, pr); err != nil {
			slog.Debug("tiered store: local fill failed", "digest", d.Sprint(), "err", err)
		}
		pr.CloseWithError(io.ErrClosedPipe) // unblock the writer if Put stopped early
	}()
	return &teeReadCloser{rc: rc, pw: pw, done: done, size: d.Size()}, nil
}

// teeReadCloser copies what the caller reads into a pipe. Writes to the
// pipe after the local Put gave up are dropped.
type teeReadCloser struct {
	rc     io.ReadCloser
	pw     *io.PipeWriter
	done   chan struct{}
	failed bool
	n      int64 // bytes read
	size   int64 // the digest's size
	eof    bool
}

func (t *teeReadCloser) Read(p []byte) (int, error) {
	n, err := t.rc.Read(p)
	t.n += int64(n)
	t.eof = err == io.EOF
	if n > 0 && !t.failed {
		if _, werr := t.pw.Write(p[:n]); werr != nil {
			t.failed = true
		}
	}
	if err == io.EOF {
		t.pw.Close()
	} else if err != nil {
		t.pw.CloseWithError(err)
	}
	return n, err
}

func (t *teeReadCloser) Close() error {
	// Callers often stop after the size they expect without reading
	// io.EOF: if the remote has nothing more, the local copy is complete.
	if !t.eof && t.n == t.size {
		var b [1]byte
		if n, err := t.rc.Read(b[:]); n == 0 && err == io.EOF {
			t.pw.Close()
		}
	}
	// A reader that stops early must not let a partial blob be stored.
	t.pw.CloseWithError(io.ErrUnexpectedEOF)
	<-t.done
	return t.rc.Close()
}

func (t *tiered) Put(ctx context.Context, d digest.Digest, r io.Reader) error {
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := t.local.Put(ctx, d, pr); err != nil {
			slog.Debug("tiered store: local write failed", "digest", d.Sprint(), "err", err)
		}
		pr.CloseWithError(io.ErrClosedPipe)
	}()
	tee := &teeReader{r: r, pw: pw}
	err := t.remote.Put(ctx, d, tee)
	if err == nil {
		// The remote may not have read everything (it had the blob); the
		// local copy is then incomplete and must not be committed.
		if tee.eof {
			pw.Close()
		} else {
			pw.CloseWithError(io.ErrUnexpectedEOF)
		}
	} else {
		pw.CloseWithError(err)
	}
	<-done
	return err
}

type teeReader struct {
	r      io.Reader
	pw     *io.PipeWriter
	failed bool
	eof    bool
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 && !t.failed {
		if _, werr := t.pw.Write(p[:n]); werr != nil {
			t.failed = true
		}
	}
	if err == io.EOF {
		t.eof = true
	}
	return n, err
}

func (t *tiered) FindMissing(ctx context.Context, ds []digest.Digest) ([]digest.Digest, error) {
	missing, err := t.local.FindMissing(ctx, ds)
	if err != nil || len(missing) == 0 {
		return missing, err
	}
	return t.remote.FindMissing(ctx, missing)
}
