package rpc

import (
	"bytes"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

func TestBufferPoolSizes(t *testing.T) {
	p := BufferPool()
	for _, n := range []int{0, 1, 255, 256, 257, 4096, 65536 + 100, 1 << 20, 1<<20 + 5000, 1 << 24, 1<<24 + 1, 40 << 20} {
		bp := p.Get(n)
		if len(*bp) != n {
			t.Fatalf("Get(%d) has length %d", n, len(*bp))
		}
		if n <= 1<<24+4096 && cap(*bp) > 2*n+4096 && n > 256 {
			t.Errorf("Get(%d) has capacity %d: too coarse a tier", n, cap(*bp))
		}
		for i := range *bp {
			(*bp)[i] = 0xaa
		}
		p.Put(bp)
		again := p.Get(n)
		if len(*again) != n {
			t.Fatalf("second Get(%d) has length %d", n, len(*again))
		}
		p.Put(again)
	}
	// Foreign buffers are dropped, not pooled under a wrong tier.
	odd := make([]byte, 1000)
	p.Put(&odd)
	if b := p.Get(1000); cap(*b) != 1024 {
		t.Errorf("Get(1000) after Put of a 1000-byte buffer has capacity %d", cap(*b))
	}
}

func TestCodecRoundTrip(t *testing.T) {
	c := encoding.GetCodecV2("proto")
	if _, ok := c.(codec); !ok {
		t.Fatalf("the registered proto codec is %T, not ours", c)
	}
	for _, n := range []int{0, 10, 100 << 10, 3 << 20} {
		in := &bspb.WriteRequest{ResourceName: "uploads/x/blobs/abc/1", WriteOffset: 7, Data: bytes.Repeat([]byte{0x5a}, n)}
		data, err := c.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		// Split the encoding into frames, as the transport delivers it.
		flat := data.Materialize()
		data.Free()
		var frames mem.BufferSlice
		for len(flat) > 0 {
			k := min(len(flat), 16<<10)
			frames = append(frames, mem.SliceBuffer(flat[:k]))
			flat = flat[k:]
		}
		out := &bspb.WriteRequest{}
		if err := c.Unmarshal(frames, out); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(in, out) {
			t.Fatalf("round trip of %d bytes differs", n)
		}
	}
	if _, err := c.Marshal("not a message"); err == nil {
		t.Error("marshalled a string")
	}
}
