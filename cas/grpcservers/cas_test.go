package grpcservers_test

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"tvixfarm/cas/digest"
	"tvixfarm/cas/grpcservers"
)

func TestBatchRoundTrip(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		for i, instance := range []string{"", "a/b"} {
			seed := uint64(fc.fn)*100 + uint64(i)*10
			blobs := [][]byte{
				[]byte("hello " + fc.name + instance),
				randBytes(seed+1, 1000),
				randBytes(seed+2, 100<<10),
				textBytes(seed+3, 300<<10),
			}
			var ds []*repb.Digest
			for _, b := range blobs {
				ds = append(ds, fc.pd(b))
			}
			if missing := e.findMissing(t, instance, fc, ds...); len(missing) != len(blobs) {
				t.Fatalf("before upload: %d of %d blobs missing, want all", len(missing), len(blobs))
			}
			// Duplicates in a request are reported once.
			if missing := e.findMissing(t, instance, fc, ds[0], ds[0]); len(missing) != 1 || !proto.Equal(missing[0], ds[0]) {
				t.Fatalf("duplicate digests: missing = %v, want [%v]", missing, ds[0])
			}

			resp, err := e.cas.BatchUpdateBlobs(testCtx(t), &repb.BatchUpdateBlobsRequest{
				InstanceName:   instance,
				DigestFunction: fc.proto,
				Requests: []*repb.BatchUpdateBlobsRequest_Request{
					{Digest: ds[0], Data: blobs[0]}, {Digest: ds[1], Data: blobs[1]},
					{Digest: ds[2], Data: blobs[2]}, {Digest: ds[3], Data: blobs[3]},
				},
			})
			if err != nil {
				t.Fatalf("BatchUpdateBlobs: %v", err)
			}
			if len(resp.Responses) != len(blobs) {
				t.Fatalf("BatchUpdateBlobs: %d responses, want %d", len(resp.Responses), len(blobs))
			}
			for i, r := range resp.Responses {
				if !proto.Equal(r.Digest, ds[i]) || codes.Code(r.Status.GetCode()) != codes.OK {
					t.Fatalf("BatchUpdateBlobs response %d: %v %v, want %v OK", i, r.Digest, r.Status, ds[i])
				}
			}
			if missing := e.findMissing(t, instance, fc, ds...); len(missing) != 0 {
				t.Fatalf("after upload: missing %v", missing)
			}

			unknown := fc.pd([]byte("never uploaded"))
			rresp, err := e.cas.BatchReadBlobs(testCtx(t), &repb.BatchReadBlobsRequest{
				InstanceName:   instance,
				DigestFunction: fc.proto,
				Digests:        append(append([]*repb.Digest{}, ds...), unknown),
			})
			if err != nil {
				t.Fatalf("BatchReadBlobs: %v", err)
			}
			if len(rresp.Responses) != len(blobs)+1 {
				t.Fatalf("BatchReadBlobs: %d responses, want %d", len(rresp.Responses), len(blobs)+1)
			}
			for i, r := range rresp.Responses[:len(blobs)] {
				if !proto.Equal(r.Digest, ds[i]) || codes.Code(r.Status.GetCode()) != codes.OK {
					t.Fatalf("BatchReadBlobs response %d: %v %v", i, r.Digest, r.Status)
				}
				if r.Compressor != repb.Compressor_IDENTITY {
					t.Fatalf("BatchReadBlobs response %d: compressor %v without acceptable_compressors", i, r.Compressor)
				}
				if !bytes.Equal(r.Data, blobs[i]) {
					t.Fatalf("BatchReadBlobs response %d: data differs", i)
				}
			}
			if r := rresp.Responses[len(blobs)]; codes.Code(r.Status.GetCode()) != codes.NotFound || !proto.Equal(r.Digest, unknown) {
				t.Fatalf("BatchReadBlobs of an unknown blob: %v %v, want NOT_FOUND", r.Digest, r.Status)
			}
		}
	})
}

// TestDigestFunctionsAreSeparate checks that the digest function of a
// request selects the hash used to verify and address blobs.
func TestDigestFunctionsAreSeparate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sha, b3 := fnCases[0], fnCases[1]
	data := []byte("same bytes, two functions")
	e.batchUpload(t, "", sha, data)
	// The SHA-256 hash, interpreted as a BLAKE3 hash, names nothing.
	if len(e.findMissing(t, "", b3, sha.pd(data))) != 1 {
		t.Fatalf("a SHA-256 digest looked up as BLAKE3 is not missing")
	}
	// Uploading data under a SHA-256 digest with digest_function=BLAKE3 fails.
	resp, err := e.cas.BatchUpdateBlobs(testCtx(t), &repb.BatchUpdateBlobsRequest{
		DigestFunction: repb.DigestFunction_BLAKE3,
		Requests:       []*repb.BatchUpdateBlobsRequest_Request{{Digest: sha.pd(data), Data: data}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if c := codes.Code(resp.Responses[0].Status.GetCode()); c != codes.InvalidArgument {
		t.Fatalf("SHA-256 digest uploaded as BLAKE3: %v, want INVALID_ARGUMENT", c)
	}
	// digest_function=SHA256 set explicitly is the same as unset.
	explicit := fnCase{"sha256-explicit", digest.SHA256, repb.DigestFunction_SHA256}
	if !e.present(t, "", explicit, sha.pd(data)) {
		t.Fatalf("blob uploaded with digest_function unset is missing with digest_function=SHA256")
	}
	e.batchUpload(t, "", b3, data)
	if !e.present(t, "", b3, b3.pd(data)) {
		t.Fatalf("BLAKE3 upload missing")
	}
}

func TestEmptyBlob(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		empty := fc.pd(nil)
		if missing := e.findMissing(t, "", fc, empty); len(missing) != 0 {
			t.Fatalf("the empty blob is missing: %v", missing)
		}
		rresp, err := e.cas.BatchReadBlobs(testCtx(t), &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: []*repb.Digest{empty}})
		if err != nil {
			t.Fatal(err)
		}
		if r := rresp.Responses[0]; codes.Code(r.Status.GetCode()) != codes.OK || len(r.Data) != 0 {
			t.Fatalf("BatchReadBlobs(empty) = %v, %d bytes", r.Status, len(r.Data))
		}
		uresp, err := e.cas.BatchUpdateBlobs(testCtx(t), &repb.BatchUpdateBlobsRequest{
			DigestFunction: fc.proto,
			Requests: []*repb.BatchUpdateBlobsRequest_Request{
				{Digest: empty},
				{Digest: empty, Data: []byte("x")},
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if c := codes.Code(uresp.Responses[0].Status.GetCode()); c != codes.OK {
			t.Fatalf("BatchUpdateBlobs(empty) = %v", uresp.Responses[0].Status)
		}
		if c := codes.Code(uresp.Responses[1].Status.GetCode()); c != codes.InvalidArgument {
			t.Fatalf("BatchUpdateBlobs(empty digest, 1 byte) = %v, want INVALID_ARGUMENT", uresp.Responses[1].Status)
		}

		// A size-0 digest with another hash names a blob that cannot
		// exist: it is missing, and reading it fails.
		bogus := &repb.Digest{Hash: strings.Repeat("0", 64), SizeBytes: 0}
		if missing := e.findMissing(t, "", fc, bogus, empty); len(missing) != 1 || !proto.Equal(missing[0], bogus) {
			t.Fatalf("FindMissingBlobs(bogus size-0 digest, empty) = %v, want [bogus]", missing)
		}
		rresp, err = e.cas.BatchReadBlobs(testCtx(t), &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: []*repb.Digest{bogus}})
		if err != nil {
			t.Fatal(err)
		}
		if c := codes.Code(rresp.Responses[0].Status.GetCode()); c != codes.NotFound {
			t.Fatalf("BatchReadBlobs(bogus size-0 digest) = %v, want NOT_FOUND", rresp.Responses[0].Status)
		}
	})
}

func TestBatchUpdateMismatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		good := []byte("good data " + fc.name)
		claimed := []byte("the claimed contents")
		sameSize := []byte("THE CLAIMED CONTENTS")
		longer := []byte("the claimed contents, and more")
		cases := []struct {
			name string
			data []byte
		}{{"same size", sameSize}, {"longer", longer}, {"shorter", claimed[:5]}, {"nil", nil}}
		reqs := []*repb.BatchUpdateBlobsRequest_Request{{Digest: fc.pd(good), Data: good}}
		for _, c := range cases {
			reqs = append(reqs, &repb.BatchUpdateBlobsRequest_Request{Digest: fc.pd(claimed), Data: c.data})
		}
		resp, err := e.cas.BatchUpdateBlobs(testCtx(t), &repb.BatchUpdateBlobsRequest{DigestFunction: fc.proto, Requests: reqs})
		if err != nil {
			t.Fatalf("BatchUpdateBlobs: %v", err)
		}
		if c := codes.Code(resp.Responses[0].Status.GetCode()); c != codes.OK {
			t.Fatalf("the good blob of a batch with bad ones: %v", resp.Responses[0].Status)
		}
		want := fc.digest(claimed)
		for i, c := range cases {
			st := resp.Responses[i+1].Status
			if codes.Code(st.GetCode()) != codes.InvalidArgument {
				t.Errorf("%s: status %v, want INVALID_ARGUMENT", c.name, st)
				continue
			}
			got := fc.digest(c.data)
			if !containsAll(st.GetMessage(), want.Hex(), got.Hex()) {
				t.Errorf("%s: message %q does not name expected digest %s and actual digest %s", c.name, st.GetMessage(), want, got)
			}
		}
		if !e.present(t, "", fc, fc.pd(good)) {
			t.Fatalf("good blob not stored")
		}
		if e.present(t, "", fc, fc.pd(claimed)) {
			t.Fatalf("mismatched data was stored")
		}
		rresp, err := e.cas.BatchReadBlobs(testCtx(t), &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: []*repb.Digest{fc.pd(claimed)}})
		if err != nil {
			t.Fatal(err)
		}
		if c := codes.Code(rresp.Responses[0].Status.GetCode()); c != codes.NotFound {
			t.Fatalf("reading the rejected blob: %v, want NOT_FOUND", rresp.Responses[0].Status)
		}
	})
}

// malformedDigests returns invalid digests, by name.
func malformedDigests(fc fnCase) map[string]*repb.Digest {
	d := fc.digest([]byte("some blob with letters in its hash"))
	h := d.Hex()
	upper := strings.ToUpper(h)
	if upper == h {
		panic("test hash has no letters")
	}
	return map[string]*repb.Digest{
		"short hash":      {Hash: h[:63], SizeBytes: d.Size()},
		"long hash":       {Hash: h + "0", SizeBytes: d.Size()},
		"sha512 length":   {Hash: h + h, SizeBytes: d.Size()},
		"empty hash":      {Hash: "", SizeBytes: 0},
		"non-hex":         {Hash: "g" + h[1:], SizeBytes: d.Size()},
		"uppercase":       {Hash: upper, SizeBytes: d.Size()},
		"with prefix":     {Hash: "sha256:" + h[7:], SizeBytes: d.Size()},
		"negative size":   {Hash: h, SizeBytes: -1},
		"very negative":   {Hash: h, SizeBytes: -1 << 62},
		"space in hash":   {Hash: " " + h[1:], SizeBytes: d.Size()},
		"slash in hash":   {Hash: "../" + h[3:], SizeBytes: d.Size()},
		"nul in the hash": {Hash: "\x00" + h[1:], SizeBytes: d.Size()},
	}
}

func TestMalformedDigests(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		good := []byte("a good blob " + fc.name)
		e.batchUpload(t, "", fc, good)
		for name, bad := range malformedDigests(fc) {
			t.Run(name, func(t *testing.T) {
				ctx := testCtx(t)
				_, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{DigestFunction: fc.proto, BlobDigests: []*repb.Digest{fc.pd(good), bad}})
				wantCode(t, err, codes.InvalidArgument, "FindMissingBlobs")

				uresp, err := e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
					DigestFunction: fc.proto,
					Requests: []*repb.BatchUpdateBlobsRequest_Request{
						{Digest: fc.pd(good), Data: good},
						{Digest: bad, Data: []byte("some blob with letters in its hash")},
					},
				})
				if err != nil {
					t.Fatalf("BatchUpdateBlobs: %v", err)
				}
				if c := codes.Code(uresp.Responses[0].Status.GetCode()); c != codes.OK {
					t.Fatalf("BatchUpdateBlobs good blob: %v", uresp.Responses[0].Status)
				}
				if c := codes.Code(uresp.Responses[1].Status.GetCode()); c != codes.InvalidArgument {
					t.Fatalf("BatchUpdateBlobs bad digest: %v, want INVALID_ARGUMENT", uresp.Responses[1].Status)
				}

				rresp, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: []*repb.Digest{fc.pd(good), bad}})
				if err != nil {
					t.Fatalf("BatchReadBlobs: %v", err)
				}
				if r := rresp.Responses[0]; codes.Code(r.Status.GetCode()) != codes.OK || !bytes.Equal(r.Data, good) {
					t.Fatalf("BatchReadBlobs good blob: %v", r.Status)
				}
				if c := codes.Code(rresp.Responses[1].Status.GetCode()); c != codes.InvalidArgument {
					t.Fatalf("BatchReadBlobs bad digest: %v, want INVALID_ARGUMENT", rresp.Responses[1].Status)
				}

				stream, err := e.cas.GetTree(ctx, &repb.GetTreeRequest{DigestFunction: fc.proto, RootDigest: bad})
				if err == nil {
					_, err = stream.Recv()
				}
				wantCode(t, err, codes.InvalidArgument, "GetTree")

				_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{DigestFunction: fc.proto, ActionDigest: bad})
				wantCode(t, err, codes.InvalidArgument, "GetActionResult")
				_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{DigestFunction: fc.proto, ActionDigest: bad, ActionResult: &repb.ActionResult{}})
				wantCode(t, err, codes.InvalidArgument, "UpdateActionResult")
				_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{
					DigestFunction: fc.proto, ActionDigest: fc.pd([]byte("action")),
					ActionResult: &repb.ActionResult{StdoutDigest: bad},
				})
				wantCode(t, err, codes.InvalidArgument, "UpdateActionResult with a bad stdout digest")
			})
		}
		// A missing digest where one is required.
		ctx := testCtx(t)
		stream, err := e.cas.GetTree(ctx, &repb.GetTreeRequest{DigestFunction: fc.proto})
		if err == nil {
			_, err = stream.Recv()
		}
		wantCode(t, err, codes.InvalidArgument, "GetTree without root_digest")
		_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{DigestFunction: fc.proto})
		wantCode(t, err, codes.InvalidArgument, "GetActionResult without action_digest")
	})
}

func TestInvalidInstanceNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, instance := range []string{"blobs", "a/../b", "../a", "a//b", "/a", "a/", ".", "a/uploads", "a/\x00"} {
		ctx := testCtx(t)
		_, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{InstanceName: instance})
		wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("FindMissingBlobs(instance %q)", instance))
		_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{InstanceName: instance})
		wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("BatchReadBlobs(instance %q)", instance))
		_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{InstanceName: instance})
		wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("BatchUpdateBlobs(instance %q)", instance))
		_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{InstanceName: instance, ActionDigest: fnCases[0].pd(nil)})
		wantCode(t, err, codes.InvalidArgument, fmt.Sprintf("GetActionResult(instance %q)", instance))
	}
}

func TestBatchSizeLimits(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	bigRecv := grpc.MaxCallRecvMsgSize(grpcservers.MaxRecvMsgSize)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		// Exactly max_batch_total_size_bytes is accepted.
		var blobs [][]byte
		var reqs []*repb.BatchUpdateBlobsRequest_Request
		var ds []*repb.Digest
		for i := range 4 {
			b := randBytes(uint64(100+i)+uint64(fc.fn)*10, 1<<20)
			blobs = append(blobs, b)
			ds = append(ds, fc.pd(b))
			reqs = append(reqs, &repb.BatchUpdateBlobsRequest_Request{Digest: fc.pd(b), Data: b})
		}
		resp, err := e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{DigestFunction: fc.proto, Requests: reqs})
		if err != nil {
			t.Fatalf("BatchUpdateBlobs of exactly 4 MiB: %v", err)
		}
		for _, r := range resp.Responses {
			if codes.Code(r.Status.GetCode()) != codes.OK {
				t.Fatalf("BatchUpdateBlobs of exactly 4 MiB: %v", r.Status)
			}
		}
		rresp, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: ds}, bigRecv)
		if err != nil {
			t.Fatalf("BatchReadBlobs of exactly 4 MiB: %v", err)
		}
		for i, r := range rresp.Responses {
			if codes.Code(r.Status.GetCode()) != codes.OK || !bytes.Equal(r.Data, blobs[i]) {
				t.Fatalf("BatchReadBlobs of exactly 4 MiB: blob %d: %v", i, r.Status)
			}
		}

		// One byte more is refused, whole.
		extra := []byte{1}
		_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
			DigestFunction: fc.proto,
			Requests:       append(reqs, &repb.BatchUpdateBlobsRequest_Request{Digest: fc.pd(extra), Data: extra}),
		})
		wantCode(t, err, codes.InvalidArgument, "BatchUpdateBlobs of 4 MiB + 1 byte")
		if e.present(t, "", fc, fc.pd(extra)) {
			t.Fatalf("blob of a refused batch was stored")
		}
		_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: append(ds, fc.pd(extra))}, bigRecv)
		wantCode(t, err, codes.InvalidArgument, "BatchReadBlobs of 4 MiB + 1 byte")
		one := randBytes(200, 5<<20)
		_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
			DigestFunction: fc.proto,
			Requests:       []*repb.BatchUpdateBlobsRequest_Request{{Digest: fc.pd(one), Data: one}},
		})
		wantCode(t, err, codes.InvalidArgument, "BatchUpdateBlobs of one 5 MiB blob")
		_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: []*repb.Digest{fc.pd(one)}})
		wantCode(t, err, codes.InvalidArgument, "BatchReadBlobs of one 5 MiB blob")

		// A malformed digest with a negative size must not offset the
		// sizes of the others.
		_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{
			DigestFunction: fc.proto,
			Digests:        append(append([]*repb.Digest{}, ds...), ds[0], ds[1], &repb.Digest{Hash: ds[0].Hash, SizeBytes: -2 << 20}),
		}, bigRecv)
		wantCode(t, err, codes.InvalidArgument, "BatchReadBlobs of 6 MiB and a digest of size -2 MiB")
	})
}

func TestBatchZstd(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	forEachFn(t, func(t *testing.T, fc fnCase) {
		ctx := testCtx(t)
		text := textBytes(uint64(fc.fn), 256<<10)
		small := []byte("tiny " + fc.name)
		random := randBytes(uint64(fc.fn)+50, 64<<10)
		ztext := zstdCompress(t, text)
		if len(ztext) >= len(text)/2 {
			t.Fatalf("test data compresses badly: %d -> %d", len(text), len(ztext))
		}
		resp, err := e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
			DigestFunction: fc.proto,
			Requests: []*repb.BatchUpdateBlobsRequest_Request{
				{Digest: fc.pd(text), Data: ztext, Compressor: repb.Compressor_ZSTD},
				{Digest: fc.pd(small), Data: zstdCompress(t, small), Compressor: repb.Compressor_ZSTD},
				{Digest: fc.pd(random), Data: random},
				{Digest: fc.pd(nil), Data: zstdCompress(t, nil), Compressor: repb.Compressor_ZSTD},
			},
		})
		if err != nil {
			t.Fatalf("BatchUpdateBlobs: %v", err)
		}
		for i, r := range resp.Responses {
			if codes.Code(r.Status.GetCode()) != codes.OK {
				t.Fatalf("BatchUpdateBlobs zstd request %d: %v", i, r.Status)
			}
		}
		ds := []*repb.Digest{fc.pd(text), fc.pd(small), fc.pd(random), fc.pd(nil)}
		want := [][]byte{text, small, random, nil}
		if missing := e.findMissing(t, "", fc, ds...); len(missing) != 0 {
			t.Fatalf("missing after zstd upload: %v", missing)
		}

		for _, acceptable := range [][]repb.Compressor_Value{nil, {repb.Compressor_ZSTD}, {repb.Compressor_IDENTITY, repb.Compressor_ZSTD}} {
			rresp, err := e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fc.proto, Digests: ds, AcceptableCompressors: acceptable})
			if err != nil {
				t.Fatalf("BatchReadBlobs(%v): %v", acceptable, err)
			}
			for i, r := range rresp.Responses {
				if codes.Code(r.Status.GetCode()) != codes.OK {
					t.Fatalf("BatchReadBlobs(%v) %d: %v", acceptable, i, r.Status)
				}
				data := r.Data
				switch r.Compressor {
				case repb.Compressor_IDENTITY:
				case repb.Compressor_ZSTD:
					if len(acceptable) == 0 {
						t.Fatalf("BatchReadBlobs: zstd response although the client accepts only identity")
					}
					data = zstdDecompress(t, data)
				default:
					t.Fatalf("BatchReadBlobs: compressor %v", r.Compressor)
				}
				if !bytes.Equal(data, want[i]) {
					t.Fatalf("BatchReadBlobs(%v) %d: data differs", acceptable, i)
				}
				if i == 0 && len(acceptable) > 0 && r.Compressor != repb.Compressor_ZSTD {
					t.Errorf("BatchReadBlobs(%v): compressible 256 KiB blob returned uncompressed", acceptable)
				}
			}
		}

		// Bad compressed uploads are refused, per blob, and not stored.
		other := textBytes(uint64(fc.fn)+99, 10<<10)
		resp, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{
			DigestFunction: fc.proto,
			Requests: []*repb.BatchUpdateBlobsRequest_Request{
				{Digest: fc.pd(other), Data: []byte("definitely not zstd"), Compressor: repb.Compressor_ZSTD},
				{Digest: fc.pd(other), Data: zstdCompress(t, append([]byte("X"), other[1:]...)), Compressor: repb.Compressor_ZSTD},
				{Digest: fc.pd(other), Data: ztext, Compressor: repb.Compressor_ZSTD},
				{Digest: fc.pd(other), Data: other, Compressor: repb.Compressor_DEFLATE},
			},
		})
		if err != nil {
			t.Fatalf("BatchUpdateBlobs: %v", err)
		}
		for i, r := range resp.Responses {
			if codes.Code(r.Status.GetCode()) != codes.InvalidArgument {
				t.Errorf("bad compressed upload %d: %v, want INVALID_ARGUMENT", i, r.Status)
			}
		}
		if e.present(t, "", fc, fc.pd(other)) {
			t.Fatalf("bad compressed upload was stored")
		}
	})
}

func TestUnsupportedDigestFunction(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	d := fnCases[0].pd([]byte("x"))
	for _, fn := range []repb.DigestFunction_Value{repb.DigestFunction_MD5, repb.DigestFunction_SHA1, repb.DigestFunction_SHA512, repb.DigestFunction_VSO, repb.DigestFunction_Value(999)} {
		ctx := testCtx(t)
		what := func(rpc string) string { return rpc + " with digest_function " + fn.String() }
		_, err := e.cas.FindMissingBlobs(ctx, &repb.FindMissingBlobsRequest{DigestFunction: fn, BlobDigests: []*repb.Digest{d}})
		wantCode(t, err, codes.InvalidArgument, what("FindMissingBlobs"))
		_, err = e.cas.BatchUpdateBlobs(ctx, &repb.BatchUpdateBlobsRequest{DigestFunction: fn, Requests: []*repb.BatchUpdateBlobsRequest_Request{{Digest: d, Data: []byte("x")}}})
		wantCode(t, err, codes.InvalidArgument, what("BatchUpdateBlobs"))
		_, err = e.cas.BatchReadBlobs(ctx, &repb.BatchReadBlobsRequest{DigestFunction: fn, Digests: []*repb.Digest{d}})
		wantCode(t, err, codes.InvalidArgument, what("BatchReadBlobs"))
		stream, err := e.cas.GetTree(ctx, &repb.GetTreeRequest{DigestFunction: fn, RootDigest: d})
		if err == nil {
			_, err = stream.Recv()
		}
		wantCode(t, err, codes.InvalidArgument, what("GetTree"))
		_, err = e.ac.GetActionResult(ctx, &repb.GetActionResultRequest{DigestFunction: fn, ActionDigest: d})
		wantCode(t, err, codes.InvalidArgument, what("GetActionResult"))
		_, err = e.ac.UpdateActionResult(ctx, &repb.UpdateActionResultRequest{DigestFunction: fn, ActionDigest: d, ActionResult: &repb.ActionResult{}})
		wantCode(t, err, codes.InvalidArgument, what("UpdateActionResult"))
	}
	// ByteStream names the function in the resource name.
	for _, name := range []string{
		"blobs/md5/" + strings.Repeat("a", 32) + "/1",
		"blobs/md5/" + d.Hash + "/1",
		"blobs/sha1/" + strings.Repeat("a", 40) + "/1",
		"blobs/SHA256/" + d.Hash + "/1",
	} {
		_, err := e.bsRead(testCtx(t), name, 0, 0)
		wantCode(t, err, codes.InvalidArgument, "Read "+name)
		_, err = e.bsWrite(testCtx(t), "uploads/"+newUUID()+"/"+name, []byte("x"), 0, 1)
		wantCode(t, err, codes.InvalidArgument, "Write "+name)
	}
}
