package farm

import (
	"context"
	"sort"
	"time"

	"tvixfarm/cas/blobstore"
	adminpb "tvixfarm/proto/tvixfarm/admin/v1"
)

// Version is the version of the binary, set by the linker.
var Version = "dev"

// adminServer implements the Admin service that `farmctl status` reads.
type adminServer struct {
	adminpb.UnimplementedAdminServer
	f       *Farm
	started time.Time
}

func (a *adminServer) Status(ctx context.Context, req *adminpb.StatusRequest) (*adminpb.StatusResponse, error) {
	resp := &adminpb.StatusResponse{
		Version:     Version,
		Roles:       []string{"storage"},
		StartedUnix: a.started.Unix(),
		DataDir:     a.f.cfg.Data,
	}
	add := func(instance string, st blobstore.Stores) {
		for _, s := range []struct {
			kind string
			ba   blobstore.BlobAccess
		}{{"cas", st.CAS}, {"action_cache", st.AC}} {
			x := blobstore.StatsOf(s.ba)
			resp.Stores = append(resp.Stores, &adminpb.StoreStatus{
				Instance: instance, Kind: s.kind, Backend: x.Backend,
				Blobs: x.Blobs, Bytes: x.Bytes, MaxBytes: x.MaxBytes,
			})
		}
	}
	add("", a.f.stores.Default)
	names := make([]string, 0, len(a.f.stores.ByName))
	for n := range a.f.stores.ByName {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		add(n, a.f.stores.ByName[n])
	}
	return resp, nil
}
