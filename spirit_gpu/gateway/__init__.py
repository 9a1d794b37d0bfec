"""The self-hostable platform side: public serverless API, agent API, proxy route."""
