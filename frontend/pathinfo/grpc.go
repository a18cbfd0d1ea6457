package pathinfo

import (
	"context"

	"google.golang.org/grpc"

	storepb "tvixfarm/proto/tvixfarm/store/v1"
)

// NewServer serves s over gRPC.
func NewServer(s Store) storepb.StoreServer { return &server{s: s} }

type server struct {
	storepb.UnimplementedStoreServer
	s Store
}

func (s *server) GetPathInfos(ctx context.Context, req *storepb.GetPathInfosRequest) (*storepb.GetPathInfosResponse, error) {
	m, err := s.s.Get(ctx, req.StorePaths)
	if err != nil {
		return nil, err
	}
	resp := &storepb.GetPathInfosResponse{PathInfos: make([]*storepb.PathInfo, 0, len(m))}
	for _, p := range req.StorePaths {
		if info, ok := m[p]; ok {
			resp.PathInfos = append(resp.PathInfos, info)
			delete(m, p)
		}
	}
	return resp, nil
}

func (s *server) GetPathInfoByHash(ctx context.Context, req *storepb.GetPathInfoByHashRequest) (*storepb.PathInfo, error) {
	return s.s.GetByHash(ctx, req.Hash)
}

func (s *server) PutPathInfos(ctx context.Context, req *storepb.PutPathInfosRequest) (*storepb.PutPathInfosResponse, error) {
	return &storepb.PutPathInfosResponse{}, s.s.Put(ctx, req.PathInfos)
}

func (s *server) GetBuild(ctx context.Context, req *storepb.GetBuildRequest) (*storepb.Build, error) {
	return s.s.GetBuild(ctx, req.DrvPath)
}

func (s *server) PutBuild(ctx context.Context, b *storepb.Build) (*storepb.PutBuildResponse, error) {
	return &storepb.PutBuildResponse{}, s.s.PutBuild(ctx, b)
}

// NewClient returns a Store that is a client of the Store service on conn.
// Requests larger than MaxBatch are split.
func NewClient(conn grpc.ClientConnInterface) Store {
	return &client{c: storepb.NewStoreClient(conn)}
}

type client struct{ c storepb.StoreClient }

func (c *client) Get(ctx context.Context, paths []string) (map[string]*storepb.PathInfo, error) {
	m := make(map[string]*storepb.PathInfo, len(paths))
	for len(paths) > 0 {
		n := min(len(paths), MaxBatch)
		resp, err := c.c.GetPathInfos(ctx, &storepb.GetPathInfosRequest{StorePaths: paths[:n]})
		if err != nil {
			return nil, err
		}
		for _, info := range resp.PathInfos {
			m[info.StorePath] = info
		}
		paths = paths[n:]
	}
	return m, nil
}

func (c *client) GetByHash(ctx context.Context, hash string) (*storepb.PathInfo, error) {
	return c.c.GetPathInfoByHash(ctx, &storepb.GetPathInfoByHashRequest{Hash: hash})
}

func (c *client) Put(ctx context.Context, infos []*storepb.PathInfo) error {
	for len(infos) > 0 {
		n := min(len(infos), MaxBatch)
		if _, err := c.c.PutPathInfos(ctx, &storepb.PutPathInfosRequest{PathInfos: infos[:n]}); err != nil {
			return err
		}
		infos = infos[n:]
	}
	return nil
}

func (c *client) GetBuild(ctx context.Context, drvPath string) (*storepb.Build, error) {
	return c.c.GetBuild(ctx, &storepb.GetBuildRequest{DrvPath: drvPath})
}

func (c *client) PutBuild(ctx context.Context, b *storepb.Build) error {
	_, err := c.c.PutBuild(ctx, b)
	return err
}
