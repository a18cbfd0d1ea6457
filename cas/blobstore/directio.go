package blobstore

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"tvixfarm/cas/digest"
)

// Large blobs are written and read with O_DIRECT when the file system
// supports it. Buffered I/O copies every byte into the page cache, which
// needs fresh memory pages: on the virtual machines tvixfarm was measured on,
// touching fresh pages runs at ~0.6 GB/s, while direct I/O to the same disk
// runs at 1.5 GB/s (writes) and 3.6 GB/s (reads). Direct I/O also keeps
// blobs that are read once from evicting the page cache of hot ones.

const (
	dioAlign   = 4096
	dioBufSize = 1 << 20
)

var dioPool = sync.Pool{New: func() any {
	b := make([]byte, dioBufSize+dioAlign)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (dioAlign - 1)); r != 0 {
		off = dioAlign - r
	}
	b = b[off : off+dioBufSize]
	return &b
}}

// openDirect opens name with O_DIRECT added to flag; ok is false if the
// file system refuses direct I/O, and the caller falls back to buffered I/O.
func openDirect(name string, flag int, perm os.FileMode) (f *os.File, ok bool, err error) {
	f, err = os.OpenFile(name, flag|syscall.O_DIRECT, perm)
	if errors.Is(err, syscall.EINVAL) {
		return nil, false, nil
	}
	return f, err == nil, err
}

// directWriter writes sequentially to a file opened with O_DIRECT through an
// aligned buffer. finish writes the padded tail and truncates the file to
// its real size.
type directWriter struct {
	f   *os.File
	bp  *[]byte
	n   int   // bytes in the buffer
	off int64 // file offset of the buffer
}

func newDirectWriter(f *os.File) *directWriter {
	return &directWriter{f: f, bp: dioPool.Get().(*[]byte)}
}

func (w *directWriter) Write(p []byte) (int, error) {
	total := len(p)
	if w.n == 0 && len(p) >= dioAlign && uintptr(unsafe.Pointer(&p[0]))&(dioAlign-1) == 0 {
		// Received chunks are usually page-aligned heap buffers of a whole
		// number of pages: write them as they are, without a copy.
		k := len(p) &^ (dioAlign - 1)
		if _, err := w.f.WriteAt(p[:k], w.off); err != nil {
			return 0, err
		}
		w.off += int64(k)
		p = p[k:]
	}
	buf := *w.bp
	for len(p) > 0 {
		c := copy(buf[w.n:], p)
		w.n += c
		p = p[c:]
		if w.n == len(buf) {
			if _, err := w.f.WriteAt(buf, w.off); err != nil {
				return total - len(p), err
			}
			w.off += int64(w.n)
			w.n = 0
		}
	}
	return total, nil
}

// finish flushes the tail and releases the buffer.
func (w *directWriter) finish() error {
	defer w.release()
	if w.n == 0 {
		return nil
	}
	buf := *w.bp
	padded := (w.n + dioAlign - 1) &^ (dioAlign - 1)
	clear(buf[w.n:padded])
	if _, err := w.f.WriteAt(buf[:padded], w.off); err != nil {
		return err
	}
	return w.f.Truncate(w.off + int64(w.n))
}

func (w *directWriter) release() {
	if w.bp != nil {
		dioPool.Put(w.bp)
		w.bp = nil
	}
}

// directReader reads a file opened with O_DIRECT through an aligned buffer.
type directReader struct {
	f      *os.File
	size   int64
	pos    int64
	bp     *[]byte
	bufOff int64 // file offset of the buffer
	bufN   int   // valid bytes in the buffer
}

func newDirectReader(f *os.File, size int64) *directReader {
	return &directReader{f: f, size: size, bp: dioPool.Get().(*[]byte), bufN: 0}
}

func (r *directReader) Read(p []byte) (int, error) {
	if r.pos >= r.size {
		return 0, io.EOF
	}
	if r.pos < r.bufOff || r.pos >= r.bufOff+int64(r.bufN) {
		r.bufOff = r.pos &^ (dioAlign - 1)
		n, err := r.f.ReadAt(*r.bp, r.bufOff)
		if err != nil && err != io.EOF {
			return 0, err
		}
		r.bufN = n
		if r.pos >= r.bufOff+int64(n) {
			return 0, io.ErrUnexpectedEOF // the file is shorter than its digest
		}
	}
	end := min(r.bufOff+int64(r.bufN), r.size)
	c := copy(p, (*r.bp)[r.pos-r.bufOff:end-r.bufOff])
	r.pos += int64(c)
	return c, nil
}

// Seek implements io.Seeker (for ByteStream reads at an offset).
func (r *directReader) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		off += r.pos
	case io.SeekEnd:
		off += r.size
	}
	if off < 0 {
		return 0, errors.New("negative seek")
	}
	r.pos = off
	return off, nil
}

func (r *directReader) Close() error {
	if r.bp != nil {
		dioPool.Put(r.bp)
		r.bp = nil
	}
	return r.f.Close()
}

// ChunkedReader is implemented by blob readers whose WriteTo passes their
// own buffers, of up to a MiB, to w: a server can send each as one message
// without copying it first.
type ChunkedReader interface {
	io.WriterTo
	ChunkedWriteTo()
}

// OwningWriter is a writer that can take a ChunkedReader's buffer instead
// of copying it (see digest.OwningWriter).
type OwningWriter = digest.OwningWriter

// ChunkedWriteTo marks directReader as a ChunkedReader.
func (r *directReader) ChunkedWriteTo() {}

// WriteTo writes the rest of the blob to w, one aligned buffer at a time,
// reading the next buffer while w consumes the current one. An
// OwningWriter gets the buffers themselves.
func (r *directReader) WriteTo(w io.Writer) (int64, error) {
	if r.pos >= r.size {
		return 0, nil
	}
	type chunk struct {
		bp  *[]byte
		off int64 // file offset of the buffer
		n   int
		err error
	}
	chunks := make(chan chunk, 1)
	stop := make(chan struct{})
	defer close(stop)
	start := r.pos &^ (dioAlign - 1)
	go func() {
		defer close(chunks)
		for off := start; off < r.size; off += dioBufSize {
			bp := dioPool.Get().(*[]byte)
			n, err := r.f.ReadAt(*bp, off)
			if err == io.EOF {
				err = nil
			}
			if err == nil && off+int64(n) < min(off+dioBufSize, r.size) {
				err = io.ErrUnexpectedEOF // the file is shorter than its digest
			}
			select {
			case chunks <- chunk{bp, off, n, err}:
			case <-stop:
				dioPool.Put(bp)
				return
			}
			if err != nil {
				return
			}
		}
	}()
	var total int64
	for c := range chunks {
		if c.err != nil {
			dioPool.Put(c.bp)
			return total, c.err
		}
		end := min(c.off+int64(c.n), r.size)
		p := (*c.bp)[r.pos-c.off : end-c.off]
		var n int
		var err error
		if ow, ok := w.(OwningWriter); ok {
			bp := c.bp
			n, err = ow.WriteOwned(p, func() { dioPool.Put(bp) })
		} else {
			n, err = w.Write(p)
			dioPool.Put(c.bp)
		}
		r.pos += int64(n)
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}
