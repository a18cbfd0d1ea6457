package farm_test

import (
	"context"
	"slices"
	"testing"

	"google.golang.org/grpc/reflection/grpc_reflection_v1"

	"tvixfarm/cas/castore"
	snixcastorepb "tvixfarm/proto/snix/castore/v1"
	castorepb "tvixfarm/proto/tvix/castore/v1"
)

// TestFarmTvixServices: a storage-only farm serves castore and
// PathInfoService under the tvix and snix names on its gRPC port,
// described by reflection, on one store.
func TestFarmTvixServices(t *testing.T) {
	cfg := testConfig(t.TempDir())
	cfg.Role = "storage"
	r := start(t, cfg)
	ctx := ctxT(t)
	rc, err := grpc_reflection_v1.NewServerReflectionClient(r.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(&grpc_reflection_v1.ServerReflectionRequest{MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	for _, want := range []string{
		"tvix.castore.v1.BlobService", "tvix.castore.v1.DirectoryService", "tvix.store.v1.PathInfoService",
		"snix.castore.v1.BlobService", "snix.castore.v1.DirectoryService", "snix.store.v1.PathInfoService",
		"grpc.health.v1.Health",
	} {
		if !slices.Contains(names, want) {
			t.Errorf("%s is not served (services: %v)", want, names)
		}
	}
	// A blob put by a Tvix client is read by a Snix client.
	put, err := castorepb.NewBlobServiceClient(r.conn).Put(ctx)
	if err != nil {
		t.Fatal(err)
	}
	put.Send(&castorepb.BlobChunk{Data: []byte("Hello World!")})
	pr, err := put.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	rd, err := snixcastorepb.NewBlobServiceClient(r.conn).Read(context.Background(), &snixcastorepb.ReadBlobRequest{Digest: pr.Digest})
	if err != nil {
		t.Fatal(err)
	}
	c, err := rd.Recv()
	if err != nil || string(c.Data) != "Hello World!" {
		t.Errorf("snix Read = %v, %v", c, err)
	}
	if _, err := snixcastorepb.NewBlobServiceClient(r.conn).Stat(ctx, &snixcastorepb.StatBlobRequest{Digest: castore.EmptyDigest[:]}); err != nil {
		t.Errorf("Stat(empty): %v", err)
	}
}
