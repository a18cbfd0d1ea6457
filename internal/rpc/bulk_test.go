package rpc

import (
	"bytes"
	"math/rand/v2"
	"testing"

	bspb "google.golang.org/genproto/googleapis/bytestream"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// frames splits b into buffers of random sizes, as HTTP/2 delivers a
// message.
func frames(r *rand.Rand, b []byte) mem.BufferSlice {
	var s mem.BufferSlice
	for len(b) > 0 {
		n := min(len(b), 1+r.IntN(20000))
		if r.IntN(8) == 0 {
			n = min(len(b), 1+r.IntN(3)) // split varints and tags too
		}
		s = append(s, mem.SliceBuffer(b[:n]))
		b = b[n:]
	}
	return s
}

// TestBulkUnmarshal decodes encodings of WriteRequests, with repeated,
// unknown and large and small fields in any order, through the codec and
// through proto.Unmarshal, and expects the same message.
func TestBulkUnmarshal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	data := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.IntN(256))
		}
		return b
	}
	for i := range 300 {
		var enc []byte
		for range 1 + r.IntN(5) {
			switch r.IntN(6) {
			case 0:
				enc = protowire.AppendTag(enc, 1, protowire.BytesType)
				enc = protowire.AppendString(enc, "uploads/x/blobs/abc/1")
			case 1:
				enc = protowire.AppendTag(enc, 2, protowire.VarintType)
				enc = protowire.AppendVarint(enc, r.Uint64N(1<<40))
			case 2:
				enc = protowire.AppendTag(enc, 3, protowire.VarintType)
				enc = protowire.AppendVarint(enc, 1)
			case 3: // unknown fields of every wire type
				enc = protowire.AppendTag(enc, 99, protowire.Fixed64Type)
				enc = protowire.AppendFixed64(enc, 7)
				enc = protowire.AppendTag(enc, 98, protowire.Fixed32Type)
				enc = protowire.AppendFixed32(enc, 7)
				enc = protowire.AppendTag(enc, 97, protowire.BytesType)
				enc = protowire.AppendBytes(enc, data(r.IntN(bulkMin*2)))
			default:
				n := r.IntN(300 << 10)
				if r.IntN(2) == 0 {
					n = r.IntN(100)
				}
				enc = protowire.AppendTag(enc, 10, protowire.BytesType)
				enc = protowire.AppendBytes(enc, data(n))
			}
		}
		want := &bspb.WriteRequest{}
		if err := proto.Unmarshal(enc, want); err != nil {
			t.Fatal(err)
		}
		got := &bspb.WriteRequest{}
		if err := (codec{}).Unmarshal(frames(r, enc), got); err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		if !proto.Equal(got, want) {
			t.Fatalf("case %d: codec decoded %d data bytes, proto %d", i, len(got.Data), len(want.Data))
		}
		// Every truncation is an error, never a panic or a wrong message.
		for range 3 {
			cut := enc[:r.IntN(len(enc)+1)]
			var w2, g2 bspb.WriteRequest
			werr := proto.Unmarshal(cut, &w2)
			gerr := (codec{}).Unmarshal(frames(r, cut), &g2)
			if (werr == nil) != (gerr == nil) || werr == nil && !proto.Equal(&w2, &g2) {
				t.Fatalf("case %d cut at %d: proto %v, codec %v", i, len(cut), werr, gerr)
			}
		}
	}
}

// TestBulkMarshal encodes messages wrapped in Bulk and decodes them back,
// and checks that the large field is sent from the message's memory.
func TestBulkMarshal(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	for _, m := range []*bspb.WriteRequest{
		{ResourceName: "r", WriteOffset: 5, FinishWrite: true, Data: big},
		{Data: big},
		{ResourceName: "small", Data: []byte("tiny")},
		{},
	} {
		s, err := (codec{}).Marshal(Bulk{Message: m})
		if err != nil {
			t.Fatal(err)
		}
		aliased := false
		for _, b := range s {
			if d := b.ReadOnlyData(); len(d) > 0 && len(m.Data) > 0 && &d[0] == &m.Data[0] {
				aliased = true
			}
		}
		if aliased != (len(m.Data) >= bulkMin) {
			t.Errorf("%d data bytes: sent from the message's memory %v", len(m.Data), aliased)
		}
		got := &bspb.WriteRequest{}
		if err := proto.Unmarshal(s.Materialize(), got); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(got, m) {
			t.Errorf("round trip of %d data bytes changed the message", len(m.Data))
		}
	}
}

// TestBulkRelease checks that Release runs once grpc-go frees the encoded
// message, and at once when nothing was sent from the message's memory.
func TestBulkRelease(t *testing.T) {
	big := make([]byte, 3*bulkMin)
	for _, m := range []*bspb.ReadResponse{{Data: big}, {Data: []byte("small")}} {
		released := 0
		s, err := (codec{}).Marshal(Bulk{Message: m, Release: func() { released++ }})
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Data) >= bulkMin {
			if released != 0 {
				t.Fatal("released before the encoded message was freed")
			}
			s.Ref() // the transport's reference
			s.Free()
			if released != 0 {
				t.Fatal("released while the transport holds the message")
			}
		}
		s.Free()
		if released != 1 {
			t.Fatalf("%d data bytes: released %d times, want 1", len(m.Data), released)
		}
	}
}
