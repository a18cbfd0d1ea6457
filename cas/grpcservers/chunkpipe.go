package grpcservers

import (
	"io"
	"sync"
)

// chunkPipe connects a ByteStream Write stream to the BlobAccess.Put that
// stores it. Unlike io.Pipe it hands the received buffers over without
// copying and buffers a few of them, so receiving the next message
// overlaps storing the previous one. The writer must not modify a buffer
// after Write; received message buffers are never reused, so that holds.
type chunkPipe struct {
	ch         chan []byte
	closeOnce  sync.Once
	werr       error // set before ch is closed: the reader's final error
	readerDone chan struct{}
	doneOnce   sync.Once
	cur        []byte
	pending    []byte // small writes being collected (writer side)
}

func newChunkPipe() *chunkPipe {
	return &chunkPipe{ch: make(chan []byte, 4), readerDone: make(chan struct{})}
}

// coalesceSize is the size of the chunks handed to the reader when the
// client sends small messages: each handoff wakes goroutines, and clients
// that send 16 or 64 KiB messages would otherwise pay that per message.
const coalesceSize = 1 << 20

// Write hands b to the reader, or, if b is small, collects it into a chunk
// of coalesceSize first. It fails once the reader has stopped.
func (p *chunkPipe) Write(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if len(p.pending) == 0 && len(b) >= coalesceSize/2 {
		return len(b), p.send(b)
	}
	return p.WriteCopy(b)
}

// WriteCopy is Write for callers that reuse b: it always copies.
func (p *chunkPipe) WriteCopy(b []byte) (int, error) {
	for rest := b; len(rest) > 0; {
		if p.pending == nil {
			p.pending = make([]byte, 0, coalesceSize)
		}
		n := copy(p.pending[len(p.pending):cap(p.pending)], rest)
		p.pending = p.pending[:len(p.pending)+n]
		rest = rest[n:]
		if len(p.pending) == cap(p.pending) {
			if err := p.flush(); err != nil {
				return len(b) - len(rest) - n, err
			}
		}
	}
	return len(b), nil
}

func (p *chunkPipe) flush() error {
	if len(p.pending) == 0 {
		return nil
	}
	c := p.pending
	p.pending = nil
	return p.send(c)
}

func (p *chunkPipe) send(b []byte) error {
	select {
	case p.ch <- b:
		return nil
	case <-p.readerDone:
		return errPutReturned
	}
}

// CloseWithError ends the stream: the reader sees err (io.EOF if nil)
// after the buffered chunks.
func (p *chunkPipe) CloseWithError(err error) {
	p.closeOnce.Do(func() {
		if err == nil {
			err = io.EOF
			if p.flush() != nil {
				err = errPutReturned
			}
		}
		p.werr = err
		close(p.ch)
	})
}

// Close ends the stream normally.
func (p *chunkPipe) Close() error {
	p.CloseWithError(nil)
	return nil
}

// CloseRead tells writers that the reader has stopped.
func (p *chunkPipe) CloseRead() {
	p.doneOnce.Do(func() { close(p.readerDone) })
}

func (p *chunkPipe) next() ([]byte, error) {
	b, ok := <-p.ch
	if !ok {
		return nil, p.werr
	}
	return b, nil
}

// Read implements io.Reader.
func (p *chunkPipe) Read(b []byte) (int, error) {
	if len(p.cur) == 0 {
		c, err := p.next()
		if err != nil {
			return 0, err
		}
		p.cur = c
	}
	n := copy(b, p.cur)
	p.cur = p.cur[n:]
	return n, nil
}

// HandsOverChunks marks chunkPipe as a digest.ChunkSource.
func (p *chunkPipe) HandsOverChunks() {}

// WriteTo implements io.WriterTo, passing the chunks themselves to w.
func (p *chunkPipe) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if len(p.cur) > 0 {
		m, err := w.Write(p.cur)
		n += int64(m)
		p.cur = nil
		if err != nil {
			return n, err
		}
	}
	for {
		c, err := p.next()
		if err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, err
		}
		m, err := w.Write(c)
		n += int64(m)
		if err != nil {
			return n, err
		}
	}
}
